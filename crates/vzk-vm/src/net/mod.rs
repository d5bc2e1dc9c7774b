//! VM networking on Linux hosts.
//!
//! * [`tap`]: TAP devices whose fd is handed to QEMU.
//! * [`link`]: bridges, addresses and enslaving through iproute2.
//! * [`nat`]: the agent-owned NAT network (bridge + dnsmasq + masquerade).
//! * [`release`]: DHCPRELEASE of a removed VM's NAT leases, so the pool does not run dry.
//! * [`discovery`]: event-driven guest IP discovery (AF_PACKET + BPF, DHCP ACK / ARP).
//!
//! Every operation acts in the network namespace of the calling thread, which is how the
//! tests confine everything to a namespace they create.

pub mod discovery;
pub mod link;
pub mod nat;
pub mod release;
pub mod tap;
