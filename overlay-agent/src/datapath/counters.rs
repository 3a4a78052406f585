//! The datapath counters as a table people can read.

use std::fmt::Write as _;

use overlay_common::{maps::Counter, stats};

/// A counter's label: its name from `overlay_common::stats` (drop reasons under `drop/`).
fn label(code: u32) -> Option<String> {
    let name = stats::name(code)?;
    Some(if stats::is_drop(code) { format!("drop/{name}") } else { name.to_string() })
}

/// Formats summed counters: what was forwarded, then what was dropped and why.
/// Counters that are zero are left out, except the forwarding ones, which always show.
pub fn table(totals: &[Counter]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:<24} {:>14} {:>16}", "COUNTER", "PACKETS", "BYTES");
    for (code, c) in totals.iter().enumerate() {
        let code = code as u32;
        let Some(label) = label(code) else { continue };
        if stats::is_drop(code) && c.packets == 0 {
            continue;
        }
        let _ = writeln!(out, "{label:<24} {:>14} {:>16}", c.packets, c.bytes);
    }
    let drops: u64 =
        totals.iter().enumerate().filter(|(i, _)| stats::is_drop(*i as u32)).map(|(_, c)| c.packets).sum();
    let _ = writeln!(out, "{:<24} {drops:>14}", "drops (total)");
    out
}

/// Counters as JSON (`{"tx_encap": {"packets": .., "bytes": ..}, "drop/unknown_vni": ...}`).
pub fn json(totals: &[Counter]) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (code, c) in totals.iter().enumerate() {
        let Some(label) = label(code as u32) else { continue };
        map.insert(label, serde_json::json!({ "packets": c.packets, "bytes": c.bytes }));
    }
    serde_json::Value::Object(map)
}
