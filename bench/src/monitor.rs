//! `--monitor`: what `overlay-agent monitor` costs the datapath. The 64-byte UDP packet rate
//! of the eBPF topology with a monitor detached (no one listens: the programs test one flag),
//! attached with flows on (on both hosts: every forwarded packet reads the clock and looks its
//! flow up in the map of flows seen), and, with `--monitor-baseline-agent`, of an agent built
//! before the monitor existed, each a topology of its own built side by side and measured in
//! interleaved rounds of the same run (the order turning each round, so no position is
//! favoured).

use std::{fmt::Write as _, path::Path, process::Stdio, time::Duration};

use anyhow::{Context as _, bail};
use overlay_tests::{Proc, Run};

use crate::{
    measure::{self, Data, Plan, Test},
    topology::{BuildOptions, HOSTS, Kind, Topology},
};

/// The variants measured, in the order of the first round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Baseline,
    Detached,
    Attached,
}

impl Variant {
    fn key(self) -> &'static str {
        match self {
            Variant::Baseline => "baseline (agent before the monitor)",
            Variant::Detached => "monitor detached",
            Variant::Attached => "monitor attached, flows on",
        }
    }
}

/// A monitor on each host of `topo`, started with `agent monitor --flows --json`; stopped
/// (SIGTERM, which clears its flags) when dropped.
struct Attached(Vec<Proc>);

impl Attached {
    fn start(run: &Run, agent: &Path, topo: &Topology) -> anyhow::Result<Self> {
        let mut procs = Vec::new();
        for (h, spec) in HOSTS.iter().enumerate() {
            let pins = run.pin_root().join(format!("{}-{}", topo.tag, spec.name));
            let mut cmd = std::process::Command::new(agent);
            cmd.args(["monitor", "--flows", "--json", "--pin-dir"])
                .arg(&pins)
                .args(["--netns", &topo.hosts[h]])
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut proc = Proc::try_spawn("monitor", &mut cmd)?;
            let err = proc.take_stderr().context("monitor stderr")?;
            // Its first line says it listens (or why not); read on a thread, with a timeout.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(err), &mut line);
                let _ = tx.send(line);
            });
            let line = rx.recv_timeout(Duration::from_secs(10)).context("the monitor's first line")?;
            if !line.contains("listening") {
                bail!("the monitor on {} said {line:?}", spec.name);
            }
            procs.push(proc);
        }
        Ok(Self(procs))
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        for p in &mut self.0 {
            p.terminate(Duration::from_secs(5));
        }
    }
}

fn pps(data: &Data) -> anyhow::Result<f64> {
    match data {
        Data::Pps { packets, secs, .. } if *secs > 0.0 => Ok(*packets as f64 / secs),
        other => bail!("not a packet-rate sample: {other:?}"),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        f64::midpoint(s[n / 2 - 1], s[n / 2])
    }
}

/// Runs the stage and returns its table (markdown), headed by the command that made it.
pub fn run(
    run: &Run,
    opts: &BuildOptions<'_>,
    baseline: Option<&Path>,
    exe: &Path,
    plan: &Plan,
    rounds: usize,
    command: &str,
) -> anyhow::Result<String> {
    let topo = Topology::build(run, Kind::Ebpf, opts).context("building the eBPF topology")?;
    let base = match baseline {
        Some(agent) => Some(
            Topology::build(run, Kind::Ebpf, &BuildOptions { agent_binary: agent, tag: Some("b"), ..*opts })
                .context("building the baseline topology")?,
        ),
        None => None,
    };
    let mut variants = vec![Variant::Detached, Variant::Attached];
    if base.is_some() {
        variants.insert(0, Variant::Baseline);
    }
    let mut got: Vec<(Variant, Vec<f64>)> = variants.iter().map(|v| (*v, Vec::new())).collect();
    for round in 0..rounds {
        for i in 0..variants.len() {
            let v = variants[(i + round) % variants.len()];
            let sample = match v {
                Variant::Baseline => measure::run(Test::UdpPps, base.as_ref().expect("baseline"), exe, plan)?,
                Variant::Detached => measure::run(Test::UdpPps, &topo, exe, plan)?,
                Variant::Attached => {
                    let _monitors = Attached::start(run, opts.agent_binary, &topo)?;
                    measure::run(Test::UdpPps, &topo, exe, plan)?
                }
            };
            let rate = pps(&sample)?;
            eprintln!("  round {}/{rounds} {:<36} {:>10.0} pps", round + 1, v.key(), rate);
            got.iter_mut().find(|(k, _)| *k == v).expect("variant").1.push(rate);
        }
    }
    let med = |v: Variant| got.iter().find(|(k, _)| *k == v).map_or(0.0, |(_, s)| median(s));
    let mut out = String::new();
    let _ = writeln!(out, "Monitor cost, 64-byte UDP packets/s, {rounds} rounds (`{command}`):\n");
    let _ = writeln!(out, "| variant | median pps | per round | ratio to detached |");
    let _ = writeln!(out, "|---|---:|---|---:|");
    for (v, samples) in &got {
        let rounds: Vec<String> = samples.iter().map(|r| format!("{r:.0}")).collect();
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {:.3} |",
            v.key(),
            med(*v),
            rounds.join(", "),
            med(*v) / med(Variant::Detached)
        );
    }
    // Per-round ratios: each pair measured minutes apart at most, the noise a machine has.
    let ratios = |a: Variant, b: Variant| -> Vec<String> {
        let (sa, sb) = (
            &got.iter().find(|(k, _)| *k == a).expect("a").1,
            &got.iter().find(|(k, _)| *k == b).expect("b").1,
        );
        sa.iter().zip(sb).map(|(x, y)| format!("{:.3}", x / y)).collect()
    };
    let _ = writeln!(out);
    if base.is_some() {
        let _ = writeln!(
            out,
            "Detached / baseline, per round: {} (median of rates {:.3}).",
            ratios(Variant::Detached, Variant::Baseline).join(", "),
            med(Variant::Detached) / med(Variant::Baseline)
        );
    }
    let _ = writeln!(
        out,
        "Attached / detached, per round: {} (median of rates {:.3}).",
        ratios(Variant::Attached, Variant::Detached).join(", "),
        med(Variant::Attached) / med(Variant::Detached)
    );
    Ok(out)
}
