//! The life of one side-car or init container slot: pull (with back-off), volumes,
//! create, start, postStart, probes, restarts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, ContainerState, ContainerStateTerminated};
use tracing::{info, warn};
use vzk_core::PodEvent;
use vzk_core::streams::AttachIo;
use vzk_docker::{DockerError, PullOutcome, PullPolicy, RegistryAuth, RunState, SidecarSpec};

use crate::engine::ContainerEngine;
use crate::pod::{PodEntry, error_chain};
use crate::probes::{self, ContainerProbes, ProbeUpdate};
use crate::provider::Inner;
use crate::restart::{Ended, Restarts, Supervised, crash_loop_message, killing_message, supervise};

use super::*;

/// The life of slot `i`: side-car `i` (container `i + 1`) or an init container, which
/// returns once it has terminated for good (under its restart policy), under the pod's
/// one supervision loop ([`crate::restart::supervise`]).
pub(crate) async fn run(inner: Arc<Inner>, e: Arc<PodEntry>, i: usize, adopt: bool) {
    let Some(c) = container(&e, i) else {
        return;
    };
    // Checked at create time; a record from an older agent may still hold a bad one.
    let probes = ContainerProbes::from_container(&c).unwrap_or_else(|err| {
        warn!(pod = %e.key, container = %c.name, error = %err, "side-car probes not run");
        ContainerProbes::default()
    });
    // The container engine.
    let rt = loop {
        match inner.sidecars.runtime().await {
            Ok(rt) => break rt,
            Err(msg) => {
                set_state(
                    &inner,
                    &e,
                    i,
                    waiting(
                        "DockerUnavailable",
                        format!("Docker is not available on this node: {msg}"),
                    ),
                    false,
                );
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    };
    let restarts = Restarts::new(e.sidecars.kind(i).and_then(|k| k.restart_policy(&e.pod)));
    let mut s = SidecarContainer {
        inner,
        e,
        i,
        c,
        probes,
        rt,
        attempt: 0,
        adopt,
        id: None,
        ran_since: Instant::now(),
    };
    supervise(&mut s, restarts).await;
}

/// Slot `i`'s state and readiness (`started` while running), pushed.
fn set_state(inner: &Inner, e: &PodEntry, i: usize, st: ContainerState, ready: bool) {
    e.sidecars.update(i, |s| {
        s.status.started = Some(st.running.is_some());
        s.status.state = Some(st);
        s.status.ready = ready;
    });
    inner.push_status(e);
}

/// A side-car or init container under [`supervise`].
struct SidecarContainer {
    inner: Arc<Inner>,
    e: Arc<PodEntry>,
    /// Its slot.
    i: usize,
    /// Its spec (the env-resolved one once known).
    c: Container,
    probes: ContainerProbes,
    rt: Arc<dyn ContainerEngine>,
    /// The attempt (run) number, a label of the container.
    attempt: u32,
    /// After an agent restart: look for the running container first.
    adopt: bool,
    /// The current container.
    id: Option<String>,
    ran_since: Instant,
}

#[async_trait::async_trait]
impl Supervised for SidecarContainer {
    fn name(&self) -> &str {
        &self.c.name
    }

    fn pod(&self) -> &vzk_core::PodKey {
        &self.e.key
    }

    fn event(&self, ev: PodEvent) {
        self.inner.container_event(&self.e, &self.c.name, ev);
    }

    async fn start(&mut self, restart: bool, _restarts: &mut Restarts) -> bool {
        let (inner, e, i) = (&self.inner, &self.e, self.i);
        if restart {
            self.attempt += 1;
            let attempt = self.attempt;
            e.sidecars.update(i, |s| {
                s.status.restart_count = i32::try_from(attempt).unwrap_or(i32::MAX);
            });
        } else if self.adopt {
            // Re-adoption: keep watching what runs.
            match self.rt.find(&e.key, &self.c.name).await {
                Ok(Some(found)) => {
                    self.attempt = found.attempt;
                    e.sidecars.update(i, |s| {
                        s.id = Some(found.id.clone());
                        s.status.restart_count = i32::try_from(found.attempt).unwrap_or(i32::MAX);
                        s.status.container_id = Some(format!("docker://{}", found.id));
                    });
                    info!(pod = %e.key, container = %self.c.name, id = %found.id, "re-adopted a side-car");
                    self.id = Some(found.id);
                    self.ran_since = Instant::now();
                    return true;
                }
                Ok(None) => {}
                Err(err) => {
                    warn!(pod = %e.key, error = %error_chain(&err), "looking for side-cars to re-adopt")
                }
            }
        }
        let Some(spec) = spec_for_create(inner, e, i, &self.c.name, self.adopt).await else {
            return false;
        };
        self.c = spec;
        match create_and_start(inner, e, &self.rt, &self.c, i, self.attempt).await {
            Some(id) => {
                self.id = Some(id);
                self.ran_since = Instant::now();
                true
            }
            None => false,
        }
    }

    async fn run(&mut self, restarts: &Restarts) -> Ended {
        let (inner, e, i, c, rt) = (&self.inner, &self.e, self.i, &self.c, &self.rt);
        let Some(id) = self.id.clone() else {
            return std::future::pending().await;
        };
        // Running (or already ended, for an adopted one).
        let mut probe_from = None;
        match rt.inspect(&id).await {
            Ok(st) => {
                e.sidecars
                    .update(i, |s| s.status.image_id = st.image_id.clone());
                let running = st.is_running();
                let state = st.to_k8s();
                if running && !self.probes.is_empty() {
                    // `started` and `ready` come from the probes.
                    probe_from = Some(started_instant(&state));
                    e.sidecars.update(i, |s| {
                        s.status.state = Some(state);
                        s.status.started = Some(false);
                        s.status.ready = false;
                    });
                    inner.push_status(e);
                } else {
                    set_state(inner, e, i, state, running);
                }
            }
            Err(err) => {
                warn!(pod = %e.key, container = %c.name, error = %error_chain(&err), "inspect")
            }
        }
        let mut killed: Option<String> = None;
        let waited = match probe_from {
            None => rt.wait(&id).await,
            Some(from) => {
                let target = Arc::new(SidecarProbeTarget {
                    rt: rt.clone(),
                    id: id.clone(),
                });
                let on = |u: ProbeUpdate| match u {
                    ProbeUpdate::Started => {
                        e.sidecars.update(i, |s| s.status.started = Some(true));
                        inner.push_status(e);
                    }
                    ProbeUpdate::Ready(r) => {
                        e.sidecars.update(i, |s| s.status.ready = r);
                        inner.push_status(e);
                    }
                    ProbeUpdate::Unhealthy { message, .. } => {
                        inner.container_event(e, &c.name, PodEvent::warning("Unhealthy", message));
                    }
                };
                tokio::select! {
                    r = rt.wait(&id) => r,
                    req = probes::run(target, self.probes.clone(), from, on) => {
                        let why = format!(
                            "Container {} failed {} probe",
                            c.name,
                            req.kind.as_str().to_lowercase()
                        );
                        inner.container_event(
                            e,
                            &c.name,
                            PodEvent::normal("Killing", killing_message(&why, restarts.restarts(137))),
                        );
                        info!(pod = %e.key, container = %c.name, reason = %why, "killing a side-car");
                        e.sidecars.update(i, |s| s.status.ready = false);
                        inner.push_status(e);
                        let grace = req.grace.unwrap_or_else(|| crate::pod::pod_grace(&e.pod));
                        if let Err(err) = rt.stop(&id, grace).await {
                            warn!(pod = %e.key, container = %c.name, error = %error_chain(&err), "stopping side-car");
                        }
                        killed = Some(format!("{why}: {}", req.message));
                        rt.wait(&id).await
                    }
                }
            }
        };
        let ended = match waited {
            Ok(st) => st,
            Err(err) => {
                let msg = error_chain(&err);
                warn!(pod = %e.key, container = %c.name, error = %msg, "side-car vanished");
                vzk_docker::SidecarState {
                    id: id.clone(),
                    image_id: String::new(),
                    status: RunState::Exited {
                        exit_code: 137,
                        reason: "ContainerCannotRun".into(),
                        message: Some(msg),
                        started_at: None,
                        finished_at: Some(k8s_openapi::jiff::Timestamp::now()),
                    },
                }
            }
        };
        let code = match &ended.status {
            RunState::Exited { exit_code, .. } => *exit_code,
            _ => 0,
        };
        let mut terminated =
            ended
                .to_k8s()
                .terminated
                .unwrap_or_else(|| ContainerStateTerminated {
                    exit_code: code,
                    ..Default::default()
                });
        if let Some(msg) = killed {
            terminated.message = Some(msg);
        }
        Ended {
            terminated,
            ran_for: self.ran_since.elapsed(),
        }
    }

    fn finished(&mut self, ended: Ended) {
        let st = ContainerState {
            terminated: Some(ended.terminated),
            ..Default::default()
        };
        set_state(&self.inner, &self.e, self.i, st, false);
    }

    fn restarting(&mut self, ended: &Ended, delay: Duration) {
        let (e, name) = (&self.e, &self.c.name);
        e.sidecars.update(self.i, |s| {
            s.status.last_state = Some(ContainerState {
                terminated: Some(ended.terminated.clone()),
                ..Default::default()
            });
            s.status.ready = false;
            s.status.started = Some(false);
            s.status.state = Some(if delay.is_zero() {
                waiting("ContainerCreating", String::new())
            } else {
                waiting("CrashLoopBackOff", crash_loop_message(delay, name, &e.key))
            });
        });
        self.inner.push_status(e);
    }
}

/// Pull (with back-off), volumes, create, start, postStart. `None` when the
/// container can never be created (the status says why).
pub(super) async fn create_and_start(
    inner: &Arc<Inner>,
    e: &Arc<PodEntry>,
    rt: &Arc<dyn ContainerEngine>,
    c: &Container,
    i: usize,
    attempt: u32,
) -> Option<String> {
    let set_waiting = |reason: &str, msg: String| {
        e.sidecars.update(i, |s| {
            s.status.ready = false;
            s.status.started = Some(false);
            s.status.state = Some(waiting(reason, msg));
        });
        inner.push_status(e);
    };
    let image = c.image.clone().unwrap_or_default();
    let policy = PullPolicy::from_k8s(c.image_pull_policy.as_deref(), &image);
    let mut pull_backoff = Duration::from_secs(10);
    let mut create_backoff = crate::probes::RestartBackoff::default();
    loop {
        // 1. The image.
        let creds = match vzk_image::Reference::parse(&image) {
            Ok(r) => match inner.credentials_for(&e.pod, &r).await {
                Ok(c) => c,
                Err(msg) => {
                    inner.container_event(
                        e,
                        &c.name,
                        PodEvent::warning("FailedToRetrieveImagePullSecret", msg),
                    );
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        };
        let auths: Vec<RegistryAuth> = creds
            .into_iter()
            .map(|c| RegistryAuth {
                username: c.username,
                password: c.password,
                identity_token: c.identity_token,
            })
            .collect();
        let will_pull = policy == PullPolicy::Always
            || (policy == PullPolicy::IfNotPresent
                && !rt.image_present(&image).await.unwrap_or(false));
        if will_pull {
            inner.container_event(
                e,
                &c.name,
                PodEvent::normal("Pulling", format!("Pulling image \"{image}\"")),
            );
        }
        match rt.ensure_image(&image, policy, &auths).await {
            Ok(PullOutcome::AlreadyPresent) => inner.container_event(
                e,
                &c.name,
                PodEvent::normal(
                    "Pulled",
                    format!("Container image \"{image}\" already present on machine"),
                ),
            ),
            Ok(PullOutcome::Pulled { elapsed }) => inner.container_event(
                e,
                &c.name,
                PodEvent::normal(
                    "Pulled",
                    format!(
                        "Successfully pulled image \"{image}\" in {:.3}s",
                        elapsed.as_secs_f64()
                    ),
                ),
            ),
            Err(err @ (DockerError::InvalidImage { .. } | DockerError::InvalidSpec(_))) => {
                let msg = error_chain(&err);
                inner.container_event(
                    e,
                    &c.name,
                    PodEvent::warning("Failed", format!("Error: {msg}")),
                );
                set_waiting(err.reason(), msg);
                return None;
            }
            Err(err) => {
                let msg = format!("Failed to pull image \"{image}\": {}", error_chain(&err));
                warn!(pod = %e.key, container = %c.name, error = %msg, "side-car pull failed");
                inner.container_event(e, &c.name, PodEvent::warning("Failed", msg.clone()));
                set_waiting(err.reason(), msg.clone());
                tokio::time::sleep(Duration::from_secs(1)).await;
                let reason = if matches!(err, DockerError::ImageNeverPull { .. }) {
                    "ErrImageNeverPull"
                } else {
                    inner.container_event(
                        e,
                        &c.name,
                        PodEvent::normal("BackOff", format!("Back-off pulling image \"{image}\"")),
                    );
                    "ImagePullBackOff"
                };
                set_waiting(reason, format!("Back-off pulling image \"{image}\": {msg}"));
                tokio::time::sleep(pull_backoff).await;
                pull_backoff = (pull_backoff * 2).min(Duration::from_secs(300));
                continue;
            }
        }
        // 2. The pod's volumes (set up by the VM's task).
        let binds = loop {
            match inner.volumes.binds_for(&e.key.uid, c) {
                Ok(b) => break b,
                Err(err) => {
                    set_waiting(
                        "ContainerCreating",
                        format!("waiting for volumes: {}", vzk_core::error_chain(&err)),
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let binds: Vec<vzk_docker::Bind> = binds
            .into_iter()
            .map(|b| vzk_docker::Bind {
                host_path: b.host_path,
                container_path: b.container_path,
                read_only: b.read_only,
            })
            .collect();
        // 3. Create and start.
        let spec = SidecarSpec {
            pod: &e.key,
            container: c,
            binds: &binds,
            attempt,
        };
        let created = match rt.create(&spec).await {
            Ok(id) => id,
            Err(err) => {
                let msg = error_chain(&err);
                inner.container_event(
                    e,
                    &c.name,
                    PodEvent::warning("Failed", format!("Error: {msg}")),
                );
                set_waiting(err.reason(), msg);
                if matches!(err, DockerError::InvalidSpec(_)) {
                    return None;
                }
                tokio::time::sleep(
                    create_backoff
                        .next_delay(Duration::ZERO)
                        .max(Duration::from_secs(1)),
                )
                .await;
                continue;
            }
        };
        e.sidecars.update(i, |s| {
            if s.id.as_deref() != Some(created.as_str()) {
                s.prev_id = s.id.take();
            }
            s.id = Some(created.clone());
            s.status.container_id = Some(format!("docker://{created}"));
        });
        // Keep the previous attempt for --previous; remove anything older.
        if let Ok(all) = rt.list_ours(Some(&e.key.uid)).await {
            for old in all
                .iter()
                .filter(|o| o.container == c.name && o.attempt + 1 < attempt)
            {
                let _ = rt.remove(&old.id).await;
            }
        }
        inner.container_event(
            e,
            &c.name,
            PodEvent::normal("Created", format!("Created container {}", c.name)),
        );
        if let Err(err) = rt.start(&created).await {
            let msg = error_chain(&err);
            inner.container_event(
                e,
                &c.name,
                PodEvent::warning("Failed", format!("Error: {msg}")),
            );
            // Docker leaves a container that could not start as exited (code 128).
            return Some(created);
        }
        inner.container_event(
            e,
            &c.name,
            PodEvent::normal("Started", format!("Started container {}", c.name)),
        );
        // 4. postStart.
        if let Some(cmd) = c
            .lifecycle
            .as_ref()
            .and_then(|l| l.post_start.as_ref())
            .and_then(|h| h.exec.as_ref())
            .and_then(|x| x.command.clone())
        {
            e.sidecars.update(i, |s| {
                s.status.state = Some(ContainerState {
                    running: Some(k8s_openapi::api::core::v1::ContainerStateRunning {
                        started_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                            k8s_openapi::jiff::Timestamp::now(),
                        )),
                    }),
                    ..Default::default()
                });
                s.status.ready = false;
            });
            inner.push_status(e);
            let sink = AttachIo {
                stdin: None,
                stdout: Some(Box::pin(tokio::io::sink())),
                stderr: Some(Box::pin(tokio::io::sink())),
                tty: false,
                resize: None,
            };
            let failure = match rt.exec(&created, cmd, sink).await {
                Ok(st) if st.success() => None,
                Ok(st) => Some(format!("PostStartHook exited with {}", st.code)),
                Err(err) => Some(format!("PostStartHook failed: {}", error_chain(&err))),
            };
            if let Some(msg) = failure {
                inner.container_event(
                    e,
                    &c.name,
                    PodEvent::warning("FailedPostStartHook", msg.clone()),
                );
                inner.container_event(
                    e,
                    &c.name,
                    PodEvent::normal(
                        "Killing",
                        format!("FailedPostStartHook: stopping container {}", c.name),
                    ),
                );
                let _ = rt.stop(&created, crate::pod::pod_grace(&e.pod)).await;
            }
        }
        return Some(created);
    }
}
