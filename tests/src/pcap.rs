//! Just enough of the pcap format to check what crossed the underlay: a capture taken with
//! `tcpdump -w` is read back and each frame classified.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::Stdio,
    time::Duration,
};

use crate::{Proc, in_ns};

/// Starts tcpdump on `dev` in namespace `ns`, writing to `file` (frames up to 256 bytes) what
/// `filter` matches, and returns once it captures: frames sent before would be missed.
/// Terminate it (SIGTERM) to have it flush and close the file.
pub fn capture(ns: &str, dev: &str, file: &Path, filter: &[&str]) -> Proc {
    let mut proc = Proc::spawn(
        "tcpdump",
        in_ns(ns, &["tcpdump", "-i", dev, "-U", "-s", "256", "-w"])
            .arg(file)
            .args(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let stderr = proc.child.as_mut().and_then(|c| c.stderr.take()).expect("tcpdump stderr");
    let (listening_tx, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Keep reading to the end, so tcpdump never blocks or dies writing its exit summary.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("listening on") {
                let _ = listening_tx.send(());
            }
        }
    });
    listening.recv_timeout(Duration::from_secs(10)).expect("tcpdump did not start capturing");
    proc
}

/// A frame in a capture.
pub struct Frame {
    pub data: Vec<u8>,
}

/// Reads a classic pcap file (microsecond or nanosecond, either byte order).
pub fn read(bytes: &[u8]) -> Vec<Frame> {
    assert!(bytes.len() >= 24, "not a pcap file");
    let magic = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        _ => panic!("not a pcap file (magic {magic:#x})"),
    };
    let u32_at = |at: usize| {
        let b: [u8; 4] = bytes[at..at + 4].try_into().expect("4 bytes");
        if le { u32::from_le_bytes(b) } else { u32::from_be_bytes(b) }
    };
    let mut frames = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let caplen = u32_at(at + 8) as usize;
        at += 16;
        if at + caplen > bytes.len() {
            break;
        }
        frames.push(Frame { data: bytes[at..at + caplen].to_vec() });
        at += caplen;
    }
    frames
}

impl Frame {
    pub fn ether_type(&self) -> u16 {
        u16::from_be_bytes([self.data[12], self.data[13]])
    }

    pub fn is_broadcast(&self) -> bool {
        self.data[..6] == [0xff; 6]
    }

    /// The VNI and inner frame, if this is IPv4/UDP to port 4789.
    pub fn vxlan(&self) -> Option<(u32, &[u8])> {
        let d = &self.data;
        if self.ether_type() != 0x0800 || d.len() < 14 + 20 + 8 + 8 + 14 {
            return None;
        }
        let ihl = ((d[14] & 0x0f) as usize) * 4;
        if d[14 + 9] != 17 {
            return None;
        }
        let udp = 14 + ihl;
        if u16::from_be_bytes([d[udp + 2], d[udp + 3]]) != 4789 {
            return None;
        }
        let vx = udp + 8;
        let vni = u32::from_be_bytes([0, d[vx + 4], d[vx + 5], d[vx + 6]]);
        Some((vni, &d[vx + 8..]))
    }
}
