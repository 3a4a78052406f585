//! The one ethtool setting the agent touches: GRO on the uplink.
//!
//! With XDP on the uplink, decapsulated frames are passed up and the driver's GRO merges the
//! inner TCP segments before TC delivers them into the container: without GRO every 1500-byte
//! frame is delivered on its own. Physical NICs have GRO on by default; veth has it off.
//!
//! Why an ioctl and not rust-netlink's `ethtool` crate (the netlink twin of the `rtnetlink` crate
//! used elsewhere): its newest release, 0.3.0, only reads features (`EthtoolFeatureHandle::get`,
//! ETHTOOL_MSG_FEATURES_GET); its one set command is ETHTOOL_MSG_CHANNELS_SET and its command enum
//! is closed, so ETHTOOL_MSG_FEATURES_SET, which turning GRO on needs, cannot be sent through it
//! (upstream: rust-netlink/ethtool issue 9, "SET commands", open). It would also bring a second
//! netlink stack (netlink-packet-core 0.9, netlink-proto 0.13) beside rtnetlink 0.18's (0.8,
//! 0.12). The legacy ETHTOOL_GGRO/ETHTOOL_SGRO ioctl is what `ethtool -K` falls back to and is
//! served by every kernel the overlay runs on: two commands, one small struct.

use std::{io, os::fd::AsRawFd as _};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

fn ioctl(ifname: &str, cmd: u32, data: u32) -> io::Result<u32> {
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!("interface name too long: {ifname}")));
    }
    // Any socket of the calling thread's namespace will do for SIOCETHTOOL.
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], data: &raw mut value, _pad: [0; 16] };
    for (dst, src) in req.name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: req and value outlive the call; the kernel reads the name and reads/writes value.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data)
}

/// Turns GRO on for `ifname` in the calling thread's namespace; returns whether it was off.
pub fn enable_gro(ifname: &str) -> io::Result<bool> {
    if ioctl(ifname, ETHTOOL_GGRO, 0)? != 0 {
        return Ok(false);
    }
    ioctl(ifname, ETHTOOL_SGRO, 1)?;
    Ok(true)
}
