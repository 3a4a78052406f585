//! Running a loaded program on one frame with BPF_PROG_TEST_RUN: the context structs the kernel
//! takes (`__sk_buff`, `xdp_md`), and what a run gives back. Used by the packet tests and the
//! fuzz suite.
//!
//! Redirect helpers only record their target in test_run (nothing is sent), so a delivered
//! frame shows as TC_ACT_REDIRECT with the frame as the program left it.

use std::mem::{offset_of, size_of};

use aya::programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp};

// linux/pkt_cls.h and linux/bpf.h verdicts.
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// The largest frame the tests hand to test_run: the kernel takes at most a page less its
/// headroom and the skb's tail; 4096 bytes of output is room for any frame plus VXLAN's 50.
const OUT_LEN: usize = 4096;

/// A `struct __sk_buff` (include/uapi/linux/bpf.h) as test_run takes it for TC programs. The
/// pointer members (`flow_keys`, `sk`) are `__bpf_md_ptr`, 8 bytes aligned to 8. The kernel
/// accepts non-zero values only in mark, priority, ingress_ifindex, ifindex, cb, tstamp,
/// wire_len, gso_segs, gso_size and hwtstamp.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SkBuff {
    pub len: u32,
    pub pkt_type: u32,
    pub mark: u32,
    pub queue_mapping: u32,
    pub protocol: u32,
    pub vlan_present: u32,
    pub vlan_tci: u32,
    pub vlan_proto: u32,
    pub priority: u32,
    pub ingress_ifindex: u32,
    pub ifindex: u32,
    pub tc_index: u32,
    pub cb: [u32; 5],
    pub hash: u32,
    pub tc_classid: u32,
    pub data: u32,
    pub data_end: u32,
    pub napi_id: u32,
    pub family: u32,
    pub remote_ip4: u32,
    pub local_ip4: u32,
    pub remote_ip6: [u32; 4],
    pub local_ip6: [u32; 4],
    pub remote_port: u32,
    pub local_port: u32,
    pub data_meta: u32,
    pub flow_keys: u64,
    pub tstamp: u64,
    pub wire_len: u32,
    pub gso_segs: u32,
    pub sk: u64,
    pub gso_size: u32,
    pub tstamp_type: u8,
    pub _bitfield: [u8; 3],
    pub hwtstamp: u64,
}

/// A `struct xdp_md` as test_run takes and returns it: `data` and `data_end` are offsets from
/// the start of the metadata area.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct XdpMd {
    pub data: u32,
    pub data_end: u32,
    pub data_meta: u32,
    pub ingress_ifindex: u32,
    pub rx_queue_index: u32,
    pub egress_ifindex: u32,
}

// The layouts as the kernel has them (checked against aya-ebpf-bindings' generated __sk_buff
// and xdp_md): a wrong offset would put ifindex where the kernel rejects it.
const _: () = {
    assert!(size_of::<SkBuff>() == 192);
    assert!(offset_of!(SkBuff, ifindex) == 40);
    assert!(offset_of!(SkBuff, cb) == 48);
    assert!(offset_of!(SkBuff, data_meta) == 140);
    assert!(offset_of!(SkBuff, flow_keys) == 144);
    assert!(offset_of!(SkBuff, tstamp) == 152);
    assert!(offset_of!(SkBuff, wire_len) == 160);
    assert!(offset_of!(SkBuff, sk) == 168);
    assert!(offset_of!(SkBuff, gso_size) == 176);
    assert!(offset_of!(SkBuff, hwtstamp) == 184);
    assert!(size_of::<XdpMd>() == 24);
};

/// Context structs are plain integers with no padding (checked above), so their bytes are
/// fully initialised.
pub trait Ctx: Copy + Default {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: see the trait comment.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref::<Self>(self).cast::<u8>(), size_of::<Self>())
        }
    }
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; every byte pattern is a valid value.
        unsafe {
            std::slice::from_raw_parts_mut(std::ptr::from_mut::<Self>(self).cast::<u8>(), size_of::<Self>())
        }
    }
}
impl Ctx for SkBuff {}
impl Ctx for XdpMd {}

/// What a TC program did with a frame.
#[derive(Debug)]
pub struct TcOut {
    pub verdict: i32,
    pub frame: Vec<u8>,
}

/// What the XDP program did with a frame: the metadata area in front of the data, and the data.
#[derive(Debug)]
pub struct XdpOut {
    pub verdict: u32,
    pub meta: Vec<u8>,
    pub frame: Vec<u8>,
}

/// The errno of a test_run the kernel refused (the program did not run), or the error itself.
fn refused(e: ProgramError) -> Result<i32, ProgramError> {
    match &e {
        ProgramError::SyscallError(s) => s.io_error.raw_os_error().ok_or(e),
        _ => Err(e),
    }
}

/// Runs the TC program `prog` on `frame` as received on `ifindex` (resolved in the calling
/// thread's network namespace), claiming to be a GSO packet of `gso_size`-byte segments when
/// that is not zero. Err(errno) when the kernel refused to run it: test_run takes no frame
/// shorter than Ethernet, nor an IPv4 or IPv6 one shorter than its fixed header (EINVAL).
pub fn tc(prog: &SchedClassifier, ifindex: u32, frame: &[u8], gso_size: u32) -> Result<TcOut, i32> {
    let ctx_in = SkBuff { ifindex, gso_size, gso_segs: u32::from(gso_size != 0), ..Default::default() };
    let mut ctx_out = SkBuff::default();
    let mut out = vec![0u8; OUT_LEN];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(ctx_in.as_bytes()),
        ctx_out: Some(ctx_out.as_bytes_mut()),
        ..Default::default()
    });
    let r = match r {
        Ok(r) => r,
        Err(e) => match refused(e) {
            Ok(errno) => return Err(errno),
            Err(e) => panic!("BPF_PROG_TEST_RUN of a TC program on a {}-byte frame: {e}", frame.len()),
        },
    };
    out.truncate(r.data_size_out as usize);
    Ok(TcOut { verdict: r.return_value as i32, frame: out })
}

/// Runs the XDP program `prog` on `frame`. Err(errno) when the kernel refused to run it (a
/// frame shorter than Ethernet: EINVAL).
pub fn xdp(prog: &Xdp, frame: &[u8]) -> Result<XdpOut, i32> {
    // With a context, the kernel insists that it describe the input exactly: no metadata,
    // data_end = the frame's length.
    let ctx_in = XdpMd { data: 0, data_end: frame.len() as u32, ..Default::default() };
    let mut ctx_out = XdpMd::default();
    let mut out = vec![0u8; OUT_LEN];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(ctx_in.as_bytes()),
        ctx_out: Some(ctx_out.as_bytes_mut()),
        ..Default::default()
    });
    let r = match r {
        Ok(r) => r,
        Err(e) => match refused(e) {
            Ok(errno) => return Err(errno),
            Err(e) => panic!("BPF_PROG_TEST_RUN of uplink_xdp on a {}-byte frame: {e}", frame.len()),
        },
    };
    out.truncate(r.data_size_out as usize);
    // test_run copies from data_meta to data_end and reports, in the returned xdp_md, where
    // data starts and ends relative to data_meta.
    assert_eq!(ctx_out.data_end as usize, out.len(), "xdp_md.data_end is the end of the copied bytes");
    assert!(ctx_out.data <= ctx_out.data_end);
    let data = ctx_out.data as usize;
    Ok(XdpOut { verdict: r.return_value, meta: out[..data].to_vec(), frame: out[data..].to_vec() })
}

/// Which frames test_run refuses to run a TC program on, and so never reach the program:
/// shorter than Ethernet, or an IPv4 (IPv6) ethertype without room for the fixed header
/// (net/bpf/test_run.c, bpf_prog_test_run_skb). XDP refuses only the first kind.
pub fn tc_refuses(frame: &[u8]) -> bool {
    if frame.len() < 14 {
        return true;
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => frame.len() < 14 + 20,
        0x86dd => frame.len() < 14 + 40,
        _ => false,
    }
}
