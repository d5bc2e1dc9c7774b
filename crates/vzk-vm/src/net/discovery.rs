//! Event-driven IPv4 discovery for a VM NIC: sniff its DHCP ACK / ARP on the TAP.
//!
//! [`spawn_discovery`] opens an `AF_PACKET` socket with a classic BPF filter that keeps
//! only ARP and IPv4/UDP frames crossing the VM's TAP (matched by interface index, so
//! nothing else on the host wakes us), and parses each frame:
//! * a DHCP ACK (server → client, UDP 67 → 68) whose `chaddr` is the VM's MAC: the
//!   guest's address is `yiaddr`, known the moment the server sends it;
//! * an ARP frame whose sender hardware address is the VM's MAC and whose sender IP is
//!   not `0.0.0.0` (the guest announcing itself or answering).
//!
//! We sniff on the TAP rather than on the bridge: every frame to or from the guest
//! crosses its TAP, including unicast ACKs from a DHCP server on another bridge port
//! (bridged mode), which the bridge device itself never sees.
//!
//! Fallback: once a second the thread's neighbour table (`/proc/thread-self/net/arp`) is
//! scanned for the MAC, in case the socket cannot be opened or the lease happened before
//! we started watching (adoption). Every new address is published on the watch channel
//! and passed to `on_ip` (used to persist it).

use std::io::Read;
use std::net::Ipv4Addr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockFilter, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::mac::MacAddr;

/// What a sniffed frame told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sighting {
    /// A DHCP ACK for the MAC carried this address.
    DhcpAck(Ipv4Addr),
    /// An ARP frame from the MAC claimed this address.
    Arp(Ipv4Addr),
}

impl Sighting {
    /// The address seen.
    pub fn ip(self) -> Ipv4Addr {
        match self {
            Self::DhcpAck(ip) | Self::Arp(ip) => ip,
        }
    }
}

/// Parses one Ethernet frame for an address belonging to `mac`.
pub fn parse_frame(frame: &[u8], mac: MacAddr) -> Option<Sighting> {
    if frame.len() < 14 {
        return None;
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0806 => parse_arp(&frame[14..], mac),
        0x0800 => parse_dhcp_ack(frame, mac),
        _ => None,
    }
}

fn parse_arp(arp: &[u8], mac: MacAddr) -> Option<Sighting> {
    // htype 1 (Ethernet), ptype 0x0800, hlen 6, plen 4, then oper, sha, spa, tha, tpa.
    if arp.len() < 28 || arp[0..6] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    if arp[8..14] != mac.0 {
        return None;
    }
    let spa = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
    (!spa.is_unspecified()).then_some(Sighting::Arp(spa))
}

fn parse_dhcp_ack(frame: &[u8], mac: MacAddr) -> Option<Sighting> {
    let sliced = etherparse::SlicedPacket::from_ethernet(frame).ok()?;
    let Some(etherparse::TransportSlice::Udp(udp)) = sliced.transport else {
        return None;
    };
    if udp.source_port() != 67 || udp.destination_port() != 68 {
        return None;
    }
    dhcp_ack_address(udp.payload(), mac).map(Sighting::DhcpAck)
}

/// The address a BOOTP/DHCP message leases to `mac` if it is a DHCPACK (RFC 2131: `op`
/// at 0, `hlen` at 2, `yiaddr` at 16, `chaddr` at 28, the magic cookie at 236, options
/// from 240). Read by hand, every length checked: any host on the bridge (a guest)
/// writes these bytes, and `dhcproto`'s decoder panicked on some (`chaddr()` past 16
/// bytes of `hlen`; a debug assertion on option 94's length).
fn dhcp_ack_address(p: &[u8], mac: MacAddr) -> Option<Ipv4Addr> {
    const BOOT_REPLY: u8 = 2;
    const COOKIE: [u8; 4] = [99, 130, 83, 99];
    const MESSAGE_TYPE: u8 = 53;
    const ACK: u8 = 5;
    if p.len() < 240
        || p[0] != BOOT_REPLY
        || !(6..=16).contains(&p[2])
        || p[28..34] != mac.0
        || p[236..240] != COOKIE
    {
        return None;
    }
    let yiaddr = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let mut opts = &p[240..];
    loop {
        match opts {
            [0, rest @ ..] => opts = rest, // pad
            [code, len, rest @ ..] if *code != 255 => {
                let data = rest.get(..usize::from(*len))?;
                if *code == MESSAGE_TYPE {
                    return (data == [ACK] && !yiaddr.is_unspecified()).then_some(yiaddr);
                }
                opts = &rest[data.len()..];
            }
            _ => return None, // end, or truncated
        }
    }
}

/// Parses `/proc/net/arp` text for `mac`'s address on `dev` (any device if `None`).
pub fn parse_proc_arp(text: &str, mac: MacAddr, dev: Option<&str>) -> Option<Ipv4Addr> {
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // IP, HW type, Flags, HW address, Mask, Device. Flags 0x0 = incomplete.
        if f.len() < 6 || f[2] == "0x0" || f[3].parse::<MacAddr>().ok()? != mac {
            return None;
        }
        if dev.is_some_and(|d| d != f[5]) {
            return None;
        }
        f[0].parse().ok()
    })
}

/// The BPF program: keep ARP and IPv4/UDP frames on interface `ifindex`, drop the rest.
fn filter(ifindex: u32) -> Vec<SockFilter> {
    const LD_W_ABS: u16 = 0x20;
    const LD_H_ABS: u16 = 0x28;
    const LD_B_ABS: u16 = 0x30;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const SKF_AD_IFINDEX: u32 = 0xffff_f000 + 8;
    vec![
        SockFilter::new(LD_W_ABS, 0, 0, SKF_AD_IFINDEX), // 0: A = ifindex
        SockFilter::new(JEQ_K, 0, 6, ifindex),           // 1: other interface → drop
        SockFilter::new(LD_H_ABS, 0, 0, 12),             // 2: A = ethertype
        SockFilter::new(JEQ_K, 3, 0, 0x0806),            // 3: ARP → accept
        SockFilter::new(JEQ_K, 0, 3, 0x0800),            // 4: not IPv4 → drop
        SockFilter::new(LD_B_ABS, 0, 0, 23),             // 5: A = IP protocol
        SockFilter::new(JEQ_K, 0, 1, 17),                // 6: not UDP → drop
        SockFilter::new(RET_K, 0, 0, 0xffff),            // 7: accept
        SockFilter::new(RET_K, 0, 0, 0),                 // 8: drop
    ]
}

/// Errors opening the sniffer.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The interface has no index (does not exist in this namespace).
    #[error("interface {0} not found")]
    NoSuchInterface(String),
    /// The packet socket could not be set up.
    #[error("opening a packet socket on {interface} failed")]
    Socket {
        /// The interface.
        interface: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Opens the filtered, non-blocking packet socket for `interface`.
pub fn open_sniffer(interface: &str) -> Result<AsyncFd<Socket>, DiscoveryError> {
    let ifindex = nix::net::if_::if_nametoindex(interface)
        .map_err(|_| DiscoveryError::NoSuchInterface(interface.to_owned()))?;
    let io = |source| DiscoveryError::Socket {
        interface: interface.to_owned(),
        source,
    };
    let proto = Protocol::from(i32::from((libc::ETH_P_ALL as u16).to_be()));
    let sock = Socket::new(Domain::PACKET, Type::RAW, Some(proto)).map_err(io)?;
    sock.attach_filter(&filter(ifindex)).map_err(io)?;
    sock.set_nonblocking(true).map_err(io)?;
    // Frames queued before the filter was attached may come from anywhere: drain them.
    let mut buf = [0u8; 2048];
    while (&sock).read(&mut buf).is_ok() {}
    // `AsyncFd::new` is deprecated for types that may not own their fd; `Socket` owns
    // it, so the registration cannot outlive the descriptor (the I/O-safety concern).
    #[allow(deprecated)]
    AsyncFd::new(sock).map_err(io)
}

/// Watches `interface` (the VM's TAP) for `mac`'s address until aborted.
///
/// Publishes each new address on `ip` and calls `on_ip` with it. The returned task runs
/// until aborted (drop-abort it with the VM's monitor).
pub fn spawn_discovery(
    interface: String,
    mac: MacAddr,
    ip: watch::Sender<Option<Ipv4Addr>>,
    on_ip: impl Fn(Ipv4Addr) + Send + Sync + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let publish = |addr: Ipv4Addr, how: &'static str| {
            if *ip.borrow() != Some(addr) {
                tracing::info!(vm.mac = %mac, ip = %addr, interface = %interface, via = how, "VM address discovered");
                ip.send_replace(Some(addr));
                on_ip(addr);
            }
        };
        let sniffer = match open_sniffer(&interface) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, interface = %interface, "packet sniffing unavailable; using the neighbour table only");
                None
            }
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut buf = vec![0u8; 2048];
        loop {
            tokio::select! {
                r = readable(sniffer.as_ref()) => {
                    let Some(mut guard) = r else { continue };
                    loop {
                        match guard.try_io(|s| s.get_ref().read(&mut buf)) {
                            Ok(Ok(n)) => {
                                if let Some(s) = parse_frame(&buf[..n], mac) {
                                    publish(s.ip(), match s { Sighting::DhcpAck(_) => "dhcp-ack", Sighting::Arp(_) => "arp" });
                                }
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "packet socket read failed");
                                break;
                            }
                            Err(_would_block) => break,
                        }
                    }
                }
                _ = tick.tick() => {
                    if let Ok(text) = std::fs::read_to_string("/proc/thread-self/net/arp")
                        && let Some(addr) = parse_proc_arp(&text, mac, None)
                    {
                        publish(addr, "neighbour-table");
                    }
                }
            }
        }
    })
}

async fn readable(
    s: Option<&AsyncFd<Socket>>,
) -> Option<tokio::io::unix::AsyncFdReadyGuard<'_, Socket>> {
    match s {
        Some(s) => s.readable().await.ok(),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use dhcproto::{Encodable, Encoder, v4};

    use super::*;

    const MAC: MacAddr = MacAddr([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);

    fn dhcp_frame(
        mac: MacAddr,
        ty: v4::MessageType,
        yiaddr: Ipv4Addr,
        sport: u16,
        dport: u16,
    ) -> Vec<u8> {
        let mut msg = v4::Message::default();
        msg.set_opcode(v4::Opcode::BootReply)
            .set_chaddr(&mac.0)
            .set_yiaddr(yiaddr);
        msg.opts_mut().insert(v4::DhcpOption::MessageType(ty));
        let mut payload = Vec::new();
        msg.encode(&mut Encoder::new(&mut payload))
            .unwrap_or_else(|e| panic!("{e}"));
        let builder = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], mac.0)
            .ipv4([10, 0, 0, 1], [255, 255, 255, 255], 64)
            .udp(sport, dport);
        let mut out = Vec::new();
        builder
            .write(&mut out, &payload)
            .unwrap_or_else(|e| panic!("{e}"));
        out
    }

    fn arp_frame(sha: MacAddr, spa: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&sha.0);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&sha.0);
        f.extend_from_slice(&spa);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 0, 0, 1]);
        f
    }

    #[test]
    fn dhcp_ack_for_our_mac_yields_the_lease() {
        let ip = Ipv4Addr::new(10, 0, 0, 42);
        let f = dhcp_frame(MAC, v4::MessageType::Ack, ip, 67, 68);
        assert_eq!(parse_frame(&f, MAC), Some(Sighting::DhcpAck(ip)));
        // Not an ACK, another MAC, wrong direction: nothing.
        assert_eq!(
            parse_frame(&dhcp_frame(MAC, v4::MessageType::Offer, ip, 67, 68), MAC),
            None
        );
        assert_eq!(
            parse_frame(
                &dhcp_frame(MacAddr::random(), v4::MessageType::Ack, ip, 67, 68),
                MAC
            ),
            None
        );
        assert_eq!(
            parse_frame(&dhcp_frame(MAC, v4::MessageType::Ack, ip, 68, 67), MAC),
            None
        );
        assert_eq!(parse_frame(&f[..30], MAC), None);
    }

    /// Found by the `ip_frames` fuzz target: a DHCP reply claiming a hardware address
    /// longer than BOOTP's 16-byte field panicked in `dhcproto`'s `chaddr()`, killing
    /// discovery; so did (in debug builds) a malformed option 94.
    #[test]
    fn dhcp_reply_with_an_overlong_hardware_address_length_is_ignored() {
        let ip = Ipv4Addr::new(10, 0, 0, 42);
        let mut f = dhcp_frame(MAC, v4::MessageType::Ack, ip, 67, 68);
        // Ethernet (14) + IPv4 (20) + UDP (8), then BOOTP's op, htype, hlen.
        assert_eq!(f[14 + 20 + 8 + 2], 6, "hlen");
        for hlen in [17, 255] {
            f[14 + 20 + 8 + 2] = hlen;
            assert_eq!(parse_frame(&f, MAC), None, "hlen {hlen}");
        }
        // Options by hand: pad, option 94 with a bad length (0), the message type.
        let mut p = dhcp_payload(&f);
        p.truncate(240);
        p.extend_from_slice(&[0, 94, 0, 53, 1, 5, 255]);
        p[2] = 6;
        assert_eq!(dhcp_ack_address(&p, MAC), Some(ip));
        // Truncated options, a length past the end, no message type: nothing.
        for opts in [
            &[53][..],
            &[53, 2, 5],
            &[12, 200, 1, 2],
            &[255, 53, 1, 5],
            &[],
        ] {
            p.truncate(240);
            p.extend_from_slice(opts);
            assert_eq!(dhcp_ack_address(&p, MAC), None, "{opts:?}");
        }
    }

    fn dhcp_payload(frame: &[u8]) -> Vec<u8> {
        frame[14 + 20 + 8..].to_vec()
    }

    #[test]
    fn arp_from_our_mac_yields_its_sender_address() {
        assert_eq!(
            parse_frame(&arp_frame(MAC, [10, 0, 0, 7]), MAC),
            Some(Sighting::Arp(Ipv4Addr::new(10, 0, 0, 7)))
        );
        assert_eq!(
            parse_frame(&arp_frame(MAC, [0, 0, 0, 0]), MAC),
            None,
            "ARP probe"
        );
        assert_eq!(
            parse_frame(&arp_frame(MacAddr::random(), [10, 0, 0, 7]), MAC),
            None
        );
    }

    #[test]
    fn neighbour_table_lookup_matches_mac_and_device() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
                    10.0.0.9         0x1         0x0         02:11:22:33:44:55     *        br0\n\
                    10.0.0.8         0x1         0x2         02:11:22:33:44:55     *        br0\n";
        assert_eq!(
            parse_proc_arp(text, MAC, Some("br0")),
            Some(Ipv4Addr::new(10, 0, 0, 8))
        );
        assert_eq!(parse_proc_arp(text, MAC, Some("br1")), None);
        assert_eq!(parse_proc_arp(text, MacAddr::random(), None), None);
    }
}
