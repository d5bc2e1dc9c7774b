//! Guest access over SSH for vz-kubelet VMs.
//!
//! Every VM gets one [`GuestSession`]: a lazily dialled, kept-alive SSH connection
//! (single-flight dial, one automatic reconnect) over which the provider runs
//! `kubectl exec` ([`GuestSession::exec`]), `kubectl attach`
//! ([`GuestSession::shell`]), `kubectl port-forward` ([`GuestSession::forward_tcp`]),
//! readiness probes ([`GuestSession::ready`], [`GuestSession::wait_ready`]) and
//! scripts whose output it needs ([`GuestSession::output`]).
//!
//! What differs from the reference implementation (macOS-vz-kubelet), on purpose:
//! * argv is sent as ONE correctly quoted command ([`quote`]), never one shell line
//!   per argument, and the exit status is the program's own (`exit-signal n` →
//!   `128 + n`);
//! * every terminal resize is applied, not just the first;
//! * the guest's host key is pinned on first connect ([`HostKeyStore`]) instead of
//!   being ignored.
//!
//! Modules: [`credentials`] (user, key, password from flags/env), [`hostkey`]
//! (trust-on-first-use pin), [`config`] (timeouts), [`quote`] (POSIX quoting),
//! [`session`] (the connection and the operations), [`exec`] (one exec channel),
//! [`dial`] (connect + authenticate). [`GuestError::into_provider_error`] maps errors
//! to the node runtime's [`vzk_core::ProviderError`].
//!
//! The crypto backend is aws-lc-rs (russh without `ring`), like the rest of the
//! workspace.
//!
//! # Caveats
//! * A cancelled exec signals the session's process (`TERM`, then `KILL`). SSH can
//!   only signal that one process: children it started and left behind (a shell
//!   script's background jobs) survive unless they die with their parent. Under a
//!   PTY, the terminal closing normally hangs up its foreground process group too
//!   (not covered by a test).
//! * dropbear 2022.83 (the Linux test guest's sshd) closes every session channel
//!   that has not started its command yet whenever any child of the connection
//!   exits (`sesscheckclose` returns true for `pid == 0` when `SIGCHLD` is pending).
//!   The session then ends with [`ExecError::ClosedBeforeStart`]: [`GuestSession::output`]
//!   (idempotent agent commands) retries (3 attempts); user execs return the error, which
//!   maps to a retryable `Unavailable`, because dropbear may still have run the
//!   command. OpenSSH (macOS guests) does not have this bug.

mod capture;
pub mod config;
pub mod credentials;
pub mod dial;
pub mod exec;
pub mod hostkey;
pub mod identity;
mod provider_error;
pub mod quote;
pub mod session;

pub use config::GuestConfig;
pub use credentials::{CredentialSource, Credentials, CredentialsError};
pub use dial::DialError;
pub use exec::ExecError;
pub use hostkey::{HostKeyError, HostKeyStore};
pub use identity::{IdentityError, PodIdentity};
pub use session::{Connector, ErrorChain, GuestError, GuestSession, Output};
