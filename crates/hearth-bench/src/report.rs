//! The run's figures as a Markdown block, with the machine described, and
//! its insertion into BENCHMARKS.md between markers named after the run.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use crate::device::Target;
use crate::run::{Config, TargetReport};

/// The machine, as far as a reader needs it to compare figures.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()))
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default();
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{nproc} CPUs ({cpu}), {:.1} GiB RAM, Linux {kernel}", mem_kib as f64 / 1024.0 / 1024.0)
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn name(t: Target) -> &'static str {
    match t {
        Target::Hearth => "Hearth cloud",
        Target::Mqtt => "Mosquitto",
    }
}

/// `a / b` as "1.23×", or "–" when there is nothing to compare.
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() && b.is_finite() {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

/// The figures of one run as Markdown.
pub fn markdown(cfg: &Config, command: &str, reports: &[TargetReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Run {} on {}.", utc_now(), machine());
    let _ = writeln!(s, "\n```\n{command}\n```\n");
    let load = if cfg.rate > 0.0 && cfg.seconds > 0.0 {
        format!(
            "{} commands/s for {} s ({}; every answer opened and verified)",
            cfg.rate,
            cfg.seconds,
            match cfg.command {
                crate::controller::Kind::Toggle => "toggle: a sealed result and a sealed state report per command",
                crate::controller::Kind::GetState => "get-state: a sealed result per command",
            }
        )
    } else {
        "no load phase (idle links only)".to_owned()
    };
    let _ = writeln!(
        s,
        "{} devices in {} worker process(es), {} controllers, {load}{}.\n",
        cfg.devices,
        if cfg.workers == 0 { cfg.devices.div_ceil(crate::run::DEVICES_PER_WORKER).max(1) } else { cfg.workers },
        cfg.controllers,
        if cfg.cloud_env.is_empty() {
            String::new()
        } else {
            format!("; cloud environment {}", cfg.cloud_env.iter().map(|(k, v)| format!("`{k}={v}`")).collect::<Vec<_>>().join(" "))
        }
    );
    if let Some(c) = &cfg.cluster {
        let _ = writeln!(
            s,
            "Hearth cloud: {} node(s) on one PostgreSQL schema and one NATS (cluster mode); devices link to {}, \
             controllers to node {}, so {}.\n",
            c.nodes,
            if c.spread { "every node (worker processes dealt round-robin)".to_owned() } else { "node 1".to_owned() },
            c.nodes,
            if c.nodes == 1 {
                "no command crosses nodes".to_owned()
            } else if c.spread {
                format!("about {} in {} commands cross nodes through NATS", c.nodes - 1, c.nodes)
            } else {
                "every command and answer crosses nodes through NATS".to_owned()
            }
        );
        for r in reports.iter().filter(|r| !r.nodes.is_empty()) {
            let _ = writeln!(s, "| node | devices | RSS before, MiB | RSS all linked idle, MiB | RSS per idle link, KiB |\n|---|---:|---:|---:|---:|");
            for (i, n) in r.nodes.iter().enumerate() {
                let per = if n.devices == 0 {
                    "–".to_owned()
                } else {
                    format!("{:.2}", n.after_kib.saturating_sub(n.before_kib) as f64 / n.devices as f64)
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.1} | {:.1} | {per} |",
                    i + 1,
                    n.devices,
                    n.before_kib as f64 / 1024.0,
                    n.after_kib as f64 / 1024.0
                );
            }
            let _ = writeln!(s, "\nThe table below sums the nodes' RSS.\n");
        }
    }
    let hearth = reports.iter().find(|r| r.target == Target::Hearth);
    let mqtt = reports.iter().find(|r| r.target == Target::Mqtt);
    let cols: Vec<&TargetReport> = reports.iter().collect();
    let mut header = String::from("| figure |");
    let mut rule = String::from("|---|");
    for r in &cols {
        let _ = write!(header, " {} |", name(r.target));
        rule.push_str("---:|");
    }
    if hearth.is_some() && mqtt.is_some() {
        header.push_str(" Hearth / Mosquitto |");
        rule.push_str("---:|");
    }
    let _ = writeln!(s, "{header}\n{rule}");
    type Fig = fn(&TargetReport) -> Option<f64>;
    type Row = (&'static str, Fig, fn(f64) -> String);
    let rows: Vec<Row> = vec![
        ("devices linked", |r| Some(r.linked as f64), |v| format!("{v:.0}")),
        ("time to link all, s", |r| Some(r.connect_secs), |v| format!("{v:.1}")),
        ("handshakes/s (ramp)", |r| Some(r.handshakes_per_sec), |v| format!("{v:.0}")),
        ("failed attempts (ramp)", |r| Some(r.ramp_failures as f64), |v| format!("{v:.0}")),
        ("links up after the idle settle", |r| Some(r.settled_up as f64), |v| format!("{v:.0}")),
        ("links ended during the idle settle", |r| Some(r.settle_drops as f64), |v| format!("{v:.0}")),
        ("server RSS before, MiB", |r| Some(r.rss_before_kib as f64 / 1024.0), |v| format!("{v:.1}")),
        ("server RSS all linked idle, MiB", |r| Some(r.rss_after_kib as f64 / 1024.0), |v| format!("{v:.1}")),
        ("RSS per idle link, KiB", |r| Some(r.rss_per_link() / 1024.0), |v| format!("{v:.2}")),
        ("commands sent", |r| r.load.as_ref().map(|l| l.sent as f64), |v| format!("{v:.0}")),
        ("throughput, answers/s", |r| r.load.as_ref().map(|l| l.answered as f64 / l.seconds), |v| format!("{v:.0}")),
        ("round trip p50, ms", |r| r.load.as_ref().map(|l| l.hist.value_at_quantile(0.50) as f64 / 1000.0), |v| format!("{v:.2}")),
        ("round trip p99, ms", |r| r.load.as_ref().map(|l| l.hist.value_at_quantile(0.99) as f64 / 1000.0), |v| format!("{v:.2}")),
        ("round trip p999, ms", |r| r.load.as_ref().map(|l| l.hist.value_at_quantile(0.999) as f64 / 1000.0), |v| format!("{v:.2}")),
        ("round trip max, ms", |r| r.load.as_ref().map(|l| l.hist.max() as f64 / 1000.0), |v| format!("{v:.2}")),
        ("lost (no answer in 5 s)", |r| r.load.as_ref().map(|l| l.lost as f64), |v| format!("{v:.0}")),
        ("errors", |r| r.load.as_ref().map(|l| (l.errors + r.device_errors) as f64), |v| format!("{v:.0}")),
        ("simulator: device core per command, ms", |r| r.load.as_ref().map(|_| r.device_core_us / 1000.0), |v| format!("{v:.2}")),
        ("simulator: controller sign + open per command, ms", |r| r.load.as_ref().map(|l| (l.sign_us + l.check_us) / 1000.0), |v| format!("{v:.2}")),
        ("reconnect all after restart, s", |r| r.reconnect_secs, |v| format!("{v:.1}")),
        ("failed attempts while reconnecting", |r| r.reconnect_secs.map(|_| r.reconnect_failures as f64), |v| format!("{v:.0}")),
    ];
    for (label, fig, fmt) in rows {
        let _ = write!(s, "| {label} |");
        for r in &cols {
            let _ = write!(s, " {} |", fig(r).map(fmt).unwrap_or_else(|| "–".into()));
        }
        if let (Some(h), Some(m)) = (hearth, mqtt) {
            let _ = write!(s, " {} |", match (fig(h), fig(m)) {
                (Some(a), Some(b)) => ratio(a, b),
                _ => "–".into(),
            });
        }
        s.push('\n');
    }
    s
}

/// Replaces (or appends) the block between `<!-- hearth-bench:LABEL:begin -->`
/// and `<!-- hearth-bench:LABEL:end -->` in `path`, leaving the rest of the
/// file (other sections, other helpers' text) as it is.
pub fn write_section(path: &Path, label: &str, body: &str) -> anyhow::Result<()> {
    let begin = format!("<!-- hearth-bench:{label}:begin -->");
    let end = format!("<!-- hearth-bench:{label}:end -->");
    let old = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let block = format!("{begin}\n{body}{end}");
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if e > b => format!("{}{block}{}", &old[..b], &old[e + end.len()..]),
        _ => {
            let sep = if old.is_empty() || old.ends_with("\n\n") { "" } else if old.ends_with('\n') { "\n" } else { "\n\n" };
            format!("{old}{sep}{block}\n")
        }
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_is_replaced_in_place_and_the_rest_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("B.md");
        std::fs::write(&p, "# Benchmarks\n\nother helper's text\n").unwrap();
        write_section(&p, "x", "one\n").unwrap();
        write_section(&p, "y", "two\n").unwrap();
        write_section(&p, "x", "three\n").unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            s,
            "# Benchmarks\n\nother helper's text\n\n<!-- hearth-bench:x:begin -->\nthree\n<!-- hearth-bench:x:end -->\n\n\
             <!-- hearth-bench:y:begin -->\ntwo\n<!-- hearth-bench:y:end -->\n"
        );
    }
}
