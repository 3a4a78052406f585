//! Types shared by the eBPF datapath (`overlay-ebpf`) and the agent (`overlay-agent`).
//!
//! Everything here is `#[repr(C)]`, has its padding spelled out, and is checked for size and
//! field offsets at compile time, so both sides agree on the bytes of every map entry and every
//! header they read or write. The packet headers are network-types' (see `wire`). With the
//! `user` feature the map types implement `aya::Pod`.
#![no_std]

pub mod dns;
pub mod maps;
pub mod monitor;
pub mod stats;
pub mod wire;

/// The IANA-assigned VXLAN UDP port (RFC 7348).
pub const VXLAN_PORT: u16 = 4789;

/// Bytes VXLAN adds in front of an inner Ethernet frame on an IPv4 underlay:
/// outer IPv4 (20) + UDP (8) + VXLAN (8) + the inner Ethernet header (14), which now travels
/// inside the tunnel instead of on the wire. A container's MTU is the uplink's MTU minus this.
pub const VXLAN_OVERHEAD: u32 = 50;

/// Bytes ESP in tunnel mode with an AES-GCM AEAD (rfc4106) adds around a VXLAN packet, at most:
/// outer IPv4 (20) + ESP header (8) + IV (8) + ICV (16) + pad length and next header (2) + up to
/// 3 bytes of padding to a 4-byte boundary. An encrypted network's containers get this much less
/// MTU on top of [`VXLAN_OVERHEAD`], so nothing fragments once encryption is on the path
/// (docs/encryption.md says why tunnel mode).
pub const ESP_OVERHEAD: u32 = 20 + 8 + 8 + 16 + 2 + 3;

/// UDP source ports for encapsulated frames are spread over the dynamic range
/// (RFC 7348 section 5 recommends 49152-65535) by a hash of the inner flow, so that
/// underlay ECMP and RSS spread tunnel traffic the way they spread the inner flows.
pub const VXLAN_SRC_PORT_MIN: u16 = 49152;
pub const VXLAN_SRC_PORT_MAX: u16 = 65535;
