//! [`VzVm`]: the `Send` handle of one Virtualization.framework VM, implementing
//! [`vzk_vm::Vm`].
//!
//! Operations go to the VM's [`Actor`] as [`Command`]s; states come from the shared
//! [`StatePublisher`]; the guest IP from a discovery task started with the VM, which
//! ends when the VM reaches a final state: the bootpd lease file for NAT NICs, BPF
//! sniffing of the host interface for bridged NICs ([`bpf`]), the ARP table for both
//! ([`crate::discovery::watch`]).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use vzk_vm::{NetworkAttachment, SnapshotSpec, VmError, VmSpec, VmState};

use super::actor::{Actor, Command, CommandError, CreateError};
use super::bpf;
use crate::config::VzConfig;
use crate::discovery::watch::{Sources, discover};
use crate::state::StatePublisher;

/// A Virtualization.framework VM.
pub struct VzVm {
    spec: VmSpec,
    actor: Actor,
    states: Arc<StatePublisher>,
    ip: watch::Sender<Option<Ipv4Addr>>,
    discovery: Sources,
    discovery_task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for VzVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VzVm")
            .field("id", &self.spec.id)
            .field("state", &self.states.current())
            .finish()
    }
}

impl VzVm {
    /// Builds the VM described by `config` on a new private queue. Not started.
    pub async fn create(
        spec: VmSpec,
        config: VzConfig,
        discovery: Sources,
    ) -> Result<Arc<Self>, CreateError> {
        let states = Arc::new(StatePublisher::new(spec.id.clone()));
        let actor = Actor::build(&spec.id, config, states.clone()).await?;
        tracing::info!(vm.id = %spec.id, backend = "vz", "VM created");
        Ok(Arc::new(Self {
            spec,
            actor,
            states,
            ip: watch::Sender::new(None),
            discovery,
            discovery_task: Mutex::new(None),
        }))
    }

    async fn send(
        &self,
        command: Command,
        operation: &'static str,
        wrap: fn(String, vzk_vm::hypervisor::BoxError) -> VmError,
    ) -> Result<(), VmError> {
        let id = self.spec.id.clone();
        match self.actor.send(command).await {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(wrap(id, Box::new(e))),
            None => Err(VmError::InvalidState {
                id,
                operation,
                state: self.states.current(),
            }),
        }
    }

    fn start_discovery(&self) {
        let Some(nic) = self.spec.nics.first() else {
            return;
        };
        let mac = nic.mac;
        let mut sources = self.discovery.clone();
        let bridged = match &nic.attachment {
            NetworkAttachment::Nat => None,
            NetworkAttachment::Bridged { interface } => {
                // bootpd serves only the NAT network: a bridged guest is found by
                // sniffing its interface, with the ARP table as the fallback.
                sources.leases_file = None;
                Some(interface.clone())
            }
        };
        let (ip, id) = (self.ip.clone(), self.spec.id.clone());
        let mut states = self.states.subscribe();
        let task = tokio::spawn(async move {
            let ended = async move {
                let _ = states.wait_for(VmState::is_final).await;
            };
            let table = discover(mac, &sources, ended);
            tokio::pin!(table);
            let stop = Arc::new(AtomicBool::new(false));
            let found = match bridged {
                None => table.await,
                Some(interface) => {
                    let stop = stop.clone();
                    let sniffer =
                        tokio::task::spawn_blocking(move || bpf::sniff(&interface, mac, &stop));
                    tokio::select! {
                        found = &mut table => found,
                        sniffed = sniffer => match sniffed {
                            Ok(Ok(Some(addr))) => Some(addr),
                            Ok(Ok(None)) => table.await,
                            Ok(Err(error)) => {
                                tracing::warn!(vm.id = %id, error = %error, "BPF sniffing failed; using the ARP table");
                                table.await
                            }
                            Err(error) => {
                                tracing::warn!(vm.id = %id, error = %error, "BPF sniffer task failed; using the ARP table");
                                table.await
                            }
                        },
                    }
                }
            };
            stop.store(true, Ordering::Relaxed);
            if let Some(addr) = found {
                tracing::info!(vm.id = %id, ip = %addr, "guest IP discovered");
                ip.send_replace(Some(addr));
            }
        });
        self.stop_discovery();
        *self
            .discovery_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(task);
    }

    fn stop_discovery(&self) {
        if let Some(task) = self
            .discovery_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

#[async_trait]
impl vzk_vm::Vm for VzVm {
    fn spec(&self) -> &VmSpec {
        &self.spec
    }

    fn state(&self) -> watch::Receiver<VmState> {
        self.states.subscribe()
    }

    fn ip_address(&self) -> watch::Receiver<Option<Ipv4Addr>> {
        self.ip.subscribe()
    }

    async fn start(&self) -> Result<(), VmError> {
        let state = self.states.current();
        if state != VmState::Created {
            return Err(VmError::InvalidState {
                id: self.spec.id.clone(),
                operation: "start",
                state,
            });
        }
        let id = self.spec.id.clone();
        // A VM restored from a template starts by loading its saved state.
        let outcome = match &self.spec.snapshot {
            Some(SnapshotSpec::Restore { state }) => self.actor.restore(state).await,
            _ => self.actor.send(Command::Start).await,
        };
        match outcome {
            Some(Ok(())) => {}
            Some(Err(CommandError::Framework(e)))
                if crate::limits::is_vm_limit_error(&e.domain, e.code) =>
            {
                return Err(VmError::LimitReached {
                    id,
                    detail: e.to_string(),
                });
            }
            Some(Err(e)) => {
                return Err(VmError::Start {
                    id,
                    source: Box::new(e),
                });
            }
            None => {
                return Err(VmError::InvalidState {
                    id,
                    operation: "start",
                    state: self.states.current(),
                });
            }
        }
        self.start_discovery();
        Ok(())
    }

    async fn save_state(&self) -> Result<(), VmError> {
        let id = self.spec.id.clone();
        let operation = "saving the state";
        let Some(SnapshotSpec::Template { state }) = &self.spec.snapshot else {
            return Err(VmError::Snapshot {
                id,
                operation,
                source: "the VM was not created as a template".into(),
            });
        };
        // The framework keeps the NICs in the saved machine (SnapshotDevices::Kept):
        // nothing is unplugged first.
        match self.actor.save_state(state).await {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(VmError::Snapshot {
                id,
                operation,
                source: Box::new(e),
            }),
            None => Err(VmError::InvalidState {
                id,
                operation,
                state: self.states.current(),
            }),
        }
    }

    async fn request_stop(&self) -> Result<(), VmError> {
        self.send(Command::RequestStop, "request stop", |id, source| {
            VmError::RequestStop { id, source }
        })
        .await
    }

    async fn force_stop(&self) -> Result<(), VmError> {
        if self.states.current().is_final() {
            return Ok(());
        }
        self.send(Command::ForceStop, "force stop", |id, source| {
            VmError::ForceStop { id, source }
        })
        .await
    }

    async fn remove(&self) -> Result<(), VmError> {
        let state = self.states.current();
        if !state.is_final() {
            return Err(VmError::InvalidState {
                id: self.spec.id.clone(),
                operation: "remove",
                state,
            });
        }
        self.stop_discovery();
        self.send(Command::Release, "remove", |id, source| VmError::Remove {
            id,
            source,
        })
        .await
    }
}

impl Drop for VzVm {
    fn drop(&mut self) {
        self.stop_discovery();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handle_is_send_and_sync() {
        assert_send_sync::<VzVm>();
        assert_send_sync::<Actor>();
    }
}
