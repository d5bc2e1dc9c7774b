//! Sniffing a host interface through a macOS BPF device, to find a bridged guest's IP.
//!
//! [`sniff`] opens the first free `/dev/bpfN`, binds it to the interface (promiscuous,
//! immediate mode, 250 ms read timeout) and reads until a frame from the guest's MAC
//! shows its IPv4 address ([`crate::discovery::frames`]) or `stop` is set. It blocks:
//! run it on a blocking thread. Needs read access to `/dev/bpf*` (root, or the
//! `access_bpf` group that Wireshark's ChmodBPF sets up).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use vzk_vm::MacAddr;

use crate::discovery::frames;

// macOS <net/bpf.h> ioctls (64-bit layouts): _IOR/_IOW('B', n, type), _IO('B', n).
const BIOCGBLEN: libc::c_ulong = 0x4004_4266;
const BIOCSETIF: libc::c_ulong = 0x8020_426c;
const BIOCSRTIMEOUT: libc::c_ulong = 0x8010_426d;
const BIOCPROMISC: libc::c_ulong = 0x2000_4269;
const BIOCIMMEDIATE: libc::c_ulong = 0x8004_4270;

/// `struct ifreq` as BIOCSETIF reads it: the name, then a 16-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    _union: [u8; 16],
}

/// `struct timeval` of 64-bit macOS.
#[repr(C)]
struct TimeVal {
    sec: i64,
    usec: i32,
}

/// Why sniffing could not run.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// Every BPF device is busy, or there is none.
    #[error("no free /dev/bpf device")]
    NoDevice,
    /// A BPF device could not be opened.
    #[error("opening {path:?} failed")]
    Open {
        /// The device.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The interface name does not fit `struct ifreq`.
    #[error("interface name {name:?} is too long")]
    InterfaceName {
        /// The name.
        name: String,
    },
    /// Configuring the device failed.
    #[error("BPF ioctl {request} failed")]
    Ioctl {
        /// Which ioctl.
        request: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading the device failed.
    #[error("reading the BPF device failed")]
    Read(#[source] io::Error),
}

/// Reads `interface`'s traffic until `mac` shows its IPv4 address; `None` once `stop`
/// is set.
pub fn sniff(
    interface: &str,
    mac: MacAddr,
    stop: &AtomicBool,
) -> Result<Option<Ipv4Addr>, BpfError> {
    let device = open_device()?;
    let buffer_len = configure(&device, interface)?;
    let mut buf = vec![0u8; buffer_len];
    while !stop.load(Ordering::Relaxed) {
        let n = match (&device).read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                continue;
            }
            Err(e) => return Err(BpfError::Read(e)),
        };
        if let Some(ip) = buf.get(..n).and_then(|b| frames::scan(b, mac)) {
            return Ok(Some(ip));
        }
    }
    Ok(None)
}

fn open_device() -> Result<File, BpfError> {
    for n in 0..256 {
        let path = PathBuf::from(format!("/dev/bpf{n}"));
        match OpenOptions::new().read(true).open(&path) {
            Ok(f) => return Ok(f),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => break,
            Err(source) => return Err(BpfError::Open { path, source }),
        }
    }
    Err(BpfError::NoDevice)
}

/// Binds and configures the device; returns the read buffer length it requires.
fn configure(device: &File, interface: &str) -> Result<usize, BpfError> {
    let fd = device.as_raw_fd();
    let check = |request: &'static str, rc: libc::c_int| {
        if rc < 0 {
            Err(BpfError::Ioctl {
                request,
                source: io::Error::last_os_error(),
            })
        } else {
            Ok(())
        }
    };
    let mut req = IfReq {
        name: [0; 16],
        _union: [0; 16],
    };
    let name = interface.as_bytes();
    if name.is_empty() || name.len() >= req.name.len() || name.contains(&0) {
        return Err(BpfError::InterfaceName {
            name: interface.to_owned(),
        });
    }
    req.name[..name.len()].copy_from_slice(name);
    let mut buffer_len: libc::c_uint = 0;
    let mut one: libc::c_uint = 1;
    let mut timeout = TimeVal {
        sec: 0,
        usec: 250_000,
    };
    // SAFETY: each ioctl gets an open BPF descriptor and a pointer to a live value of
    // the type its request encodes (u_int, struct ifreq, struct timeval), or no
    // argument for BIOCPROMISC.
    unsafe {
        check("BIOCGBLEN", libc::ioctl(fd, BIOCGBLEN, &mut buffer_len))?;
        check("BIOCSETIF", libc::ioctl(fd, BIOCSETIF, &mut req))?;
        check("BIOCIMMEDIATE", libc::ioctl(fd, BIOCIMMEDIATE, &mut one))?;
        check(
            "BIOCSRTIMEOUT",
            libc::ioctl(fd, BIOCSRTIMEOUT, &mut timeout),
        )?;
        check("BIOCPROMISC", libc::ioctl(fd, BIOCPROMISC))?;
    }
    // `read` must be given a buffer of exactly this length.
    usize::try_from(buffer_len).map_err(|_| BpfError::Ioctl {
        request: "BIOCGBLEN",
        source: io::Error::from(io::ErrorKind::InvalidData),
    })
}
