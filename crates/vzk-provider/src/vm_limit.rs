//! The hypervisor's limit of running VMs, and its leak.
//!
//! Virtualization.framework runs at most two macOS VMs per host and refuses a third with
//! `VZErrorVirtualMachineLimitExceeded` (`vzk_vm::VmError::LimitReached`). A known macOS
//! bug leaks that count: the framework keeps refusing while fewer VMs run than the limit,
//! until the host reboots. Each refusal becomes a pod event; a refusal while fewer of
//! this node's VMs run than the limit is a leak (or another program on the host runs
//! VMs), which turns the node condition `VMLimitLeaked` True with the operator's remedy
//! and drops the node's `vz-kubelet.io/vm` capacity to what runs, so the scheduler stops
//! sending VM pods. A later successful start clears it.

use k8s_openapi::api::core::v1::NodeCondition;

/// The condition type.
pub const CONDITION: &str = "VMLimitLeaked";

/// A refusal to start a VM: how many of this node's VMs ran then, and the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// This node's VMs running (starting, running or stopping) when it was refused.
    pub running: u32,
    /// The backend's limit of running VMs.
    pub limit: u32,
}

/// What the node knows about the limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmLimit {
    leak: Option<Refusal>,
}

impl VmLimit {
    /// A start was refused with `running` of this node's VMs up, under the backend's
    /// `limit` (`None`: the backend states none, so any refusal is below it).
    /// Returns the refusal when it is a leak.
    pub fn refused(&mut self, running: u32, limit: Option<u32>) -> Option<Refusal> {
        let limit = limit.unwrap_or(u32::MAX);
        if running < limit {
            let r = Refusal { running, limit };
            self.leak = Some(r);
            Some(r)
        } else {
            None
        }
    }

    /// A VM started: the framework accepts VMs again.
    pub fn started(&mut self) {
        self.leak = None;
    }

    /// The leak, if one was seen and not cleared.
    pub fn leak(&self) -> Option<Refusal> {
        self.leak
    }

    /// The `vz-kubelet.io/vm` capacity to advertise with `slots` VM slots.
    pub fn vm_capacity(&self, slots: u32) -> u32 {
        match self.leak {
            Some(r) => r.running.min(slots),
            None => slots,
        }
    }

    /// The node condition.
    pub fn condition(&self) -> NodeCondition {
        let (status, reason, message) = match self.leak {
            None => (
                "False",
                "VMLimitOK",
                "the hypervisor accepts VMs up to its limit".to_owned(),
            ),
            Some(r) => (
                "True",
                "VMLimitLeaked",
                format!(
                    "the hypervisor refused a VM while only {} of its {} VMs ran on this node: \
                     either another program on this host runs VMs, or the macOS \
                     Virtualization.framework limit has leaked, which only a reboot clears. \
                     New VM pods are not accepted (vz-kubelet.io/vm capacity {}); drain the \
                     node (kubectl drain) and reboot the host",
                    r.running,
                    if r.limit == u32::MAX {
                        "unbounded".to_owned()
                    } else {
                        r.limit.to_string()
                    },
                    r.running
                ),
            ),
        };
        NodeCondition {
            type_: CONDITION.to_owned(),
            status: status.to_owned(),
            reason: Some(reason.to_owned()),
            message: Some(message),
            last_heartbeat_time: None,
            last_transition_time: None,
        }
    }
}

/// The pod event's message for a refusal.
pub fn event_message(detail: &str, running: u32, limit: Option<u32>) -> String {
    match limit {
        Some(l) => format!(
            "the hypervisor refuses another VM ({running} of this node's VMs run, its limit is {l}): {detail}"
        ),
        None => format!("the hypervisor refuses another VM ({running} run): {detail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_at_the_limit_is_no_leak() {
        let mut l = VmLimit::default();
        assert_eq!(l.refused(2, Some(2)), None);
        assert_eq!(l.leak(), None);
        assert_eq!(l.condition().status, "False");
        assert_eq!(l.vm_capacity(2), 2);
    }

    #[test]
    fn a_refusal_below_the_limit_is_a_leak_until_a_start_succeeds() {
        let mut l = VmLimit::default();
        let r = l.refused(1, Some(2));
        assert_eq!(
            r,
            Some(Refusal {
                running: 1,
                limit: 2
            })
        );
        let c = l.condition();
        assert_eq!(
            (c.type_.as_str(), c.status.as_str(), c.reason.as_deref()),
            (CONDITION, "True", Some("VMLimitLeaked"))
        );
        let m = c.message.unwrap_or_default();
        assert!(m.contains("only 1 of its 2"), "{m}");
        assert!(m.contains("reboot"), "{m}");
        assert_eq!(l.vm_capacity(2), 1, "the scheduler stops sending VM pods");
        l.started();
        assert_eq!(l.leak(), None);
        assert_eq!(l.vm_capacity(2), 2);
    }

    #[test]
    fn no_vm_running_and_refused_means_capacity_zero() {
        let mut l = VmLimit::default();
        assert!(l.refused(0, Some(2)).is_some());
        assert_eq!(l.vm_capacity(3), 0);
        assert!(l.refused(0, None).is_some(), "no stated limit: any refusal");
    }

    #[test]
    fn events_name_the_count_and_the_limit() {
        assert_eq!(
            event_message("VZErrorDomain error 6", 2, Some(2)),
            "the hypervisor refuses another VM (2 of this node's VMs run, its limit is 2): VZErrorDomain error 6"
        );
    }
}
