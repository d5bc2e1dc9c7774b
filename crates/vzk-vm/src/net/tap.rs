//! TAP devices for VM NICs, created with `ioctl(TUNSETIFF)` on `/dev/net/tun`.
//!
//! [`create_tap`] returns the queue's file descriptor; QEMU receives it as
//! `-netdev tap,fd=N`, so it needs no `CAP_NET_ADMIN`, helper or script. The device is
//! not persistent: it disappears when the last descriptor closes (when QEMU exits), so a
//! VM never leaks its TAP. The device is created in the network namespace of the calling
//! thread.
//!
//! This is one of the two places in the crate with `unsafe` code (the ioctl); each block
//! carries its safety argument.
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` restricted to the members TUNSETIFF reads (name, flags), padded to the
/// kernel's 40 bytes.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

nix::ioctl_write_ptr_bad!(tun_set_iff, TUNSETIFF, IfReqFlags);

/// Errors creating a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit `IFNAMSIZ - 1` bytes or contains a NUL/`/`.
    #[error("invalid interface name {0:?}")]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("opening /dev/net/tun failed")]
    OpenTun(#[source] io::Error),
    /// The kernel refused the TUNSETIFF request.
    #[error("creating TAP {name} failed")]
    SetIff {
        /// The requested name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Creates (or attaches to) the TAP `name` with a virtio-net header and returns its fd.
pub fn create_tap(name: &str) -> Result<OwnedFd, TapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.len() >= libc::IFNAMSIZ
        || bytes.iter().any(|&b| b == 0 || b == b'/')
    {
        return Err(TapError::InvalidName(name.to_owned()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: `file` is an open /dev/net/tun descriptor for the whole call, and `req` is a
    // fully initialised, correctly sized `struct ifreq` prefix that outlives the call;
    // TUNSETIFF only reads `ifr_name`/`ifr_flags` (and writes back the name in place).
    unsafe { tun_set_iff(file.as_raw_fd(), &req) }.map_err(|e| TapError::SetIff {
        name: name.to_owned(),
        source: io::Error::from(e),
    })?;
    Ok(file.into())
}

/// `SIOCBRADDIF` (linux/sockios.h): add the interface `ifr_ifindex` to the bridge named
/// in `ifr_name`.
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// `struct ifreq` with the `ifr_ifindex` member (SIOCBRADDIF).
#[repr(C)]
struct IfReqIndex {
    name: [u8; libc::IFNAMSIZ],
    index: libc::c_int,
    _pad: [u8; 20],
}

nix::ioctl_write_ptr_bad!(br_add_if, SIOCBRADDIF, IfReqIndex);
nix::ioctl_read_bad!(get_if_flags, libc::SIOCGIFFLAGS, IfReqFlags);
nix::ioctl_write_ptr_bad!(set_if_flags, libc::SIOCSIFFLAGS, IfReqFlags);

fn ifname(name: &str) -> io::Result<[u8; libc::IFNAMSIZ]> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    let mut out = [0u8; libc::IFNAMSIZ];
    out[..bytes.len()].copy_from_slice(bytes);
    Ok(out)
}

/// Enslaves `port` to `bridge` and sets it up with two ioctls on a datagram socket (what
/// `brctl addif` + `ip link set up` do), in the network namespace of the calling thread:
/// no `ip` process per VM start.
pub(crate) fn enslave_and_up(port: &str, bridge: &str) -> io::Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    let index = nix::net::if_::if_nametoindex(port).map_err(io::Error::from)?;
    let add = IfReqIndex {
        name: ifname(bridge)?,
        index: libc::c_int::try_from(index)
            .map_err(|_| io::Error::other(format!("interface index {index} out of range")))?,
        _pad: [0; 20],
    };
    // SAFETY: `sock` is an open socket for the whole call; `add` is a fully initialised
    // 40-byte `struct ifreq` (name + ifindex) that outlives the call and is only read.
    unsafe { br_add_if(sock.as_raw_fd(), &add) }.map_err(io::Error::from)?;
    let mut req = IfReqFlags {
        name: ifname(port)?,
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: as above; SIOCGIFFLAGS writes `ifr_flags` into `req`, which is valid and
    // exclusively borrowed for the call.
    unsafe { get_if_flags(sock.as_raw_fd(), &mut req) }.map_err(io::Error::from)?;
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    unsafe { set_if_flags(sock.as_raw_fd(), &req) }.map_err(io::Error::from)?;
    Ok(())
}

/// A deterministic TAP name for NIC `index` of VM `id` of the backend whose state dir
/// is `scope` (`vzk` + 8 hex + `n` + index). TAP names are host-global (per network
/// namespace): the scope keeps two agents' VMs of the same id (`vm run --id manual`, a
/// pod UID seen by two clusters) apart. The name is recorded in the VM's state dir, so
/// re-adoption never recomputes it.
pub fn tap_name(scope: &str, id: &str, index: usize) -> String {
    // FNV-1a: stable across versions and processes (unlike `DefaultHasher`).
    let mut h: u32 = 0x811c_9dc5;
    for b in scope.bytes().chain([0]).chain(id.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("vzk{h:08x}n{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_stable_short_and_distinct() {
        let a = tap_name("/var/lib/a/qemu", "default-web-0", 0);
        assert_eq!(a, tap_name("/var/lib/a/qemu", "default-web-0", 0));
        assert!(a.len() < libc::IFNAMSIZ, "{a}");
        assert_ne!(a, tap_name("/var/lib/a/qemu", "default-web-1", 0));
        assert_ne!(a, tap_name("/var/lib/a/qemu", "default-web-0", 1));
        // Another agent's state dir: another name for the same VM id.
        assert_ne!(a, tap_name("/var/lib/b/qemu", "default-web-0", 0));
        assert!(matches!(
            create_tap(&"x".repeat(16)),
            Err(TapError::InvalidName(_))
        ));
    }
}
