//! wisp-vmm's boot timeline as the benchmark sees it, in milliseconds since the
//! benchmark spawned the VMM: the VMM's own milestones (control API `BootTimeline`,
//! microseconds since the VMM process started) shifted by the exec delay, then the
//! guest's first console line and its userspace marker as they reached the host.
//! The exec delay is estimated from the VMM's `boot timeline: <name> at <ms> ms` log
//! lines: arrival time minus the VMM's own time, the smallest over all lines.
//! Between the first console line and the marker, the longest silences on the
//! console show where the guest kernel spends its time.

use std::time::Instant;

use anyhow::{bail, Context};

use super::stats::Summary;
use super::timed::{Line, Stream};

pub const SPAWN: &str = "spawn";
pub const FIRST_CONSOLE: &str = "first_console_output";
pub const MARKER: &str = "userspace_marker";
/// When the host's health check (ttrpc Check over hybrid vsock) got the agent's answer.
pub const AGENT_ANSWERED: &str = "agent_answered";
/// How many of the longest console silences a timeline keeps.
const GAPS_KEPT: usize = 5;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    pub name: String,
    /// Since the benchmark spawned the VMM.
    pub at_ms: f64,
}

/// A silence on the guest console: `ms` between the line `after` and the line `before`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleGap {
    pub ms: f64,
    pub after: String,
    pub before: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Timeline {
    /// In time order, from `spawn` to `userspace_marker`.
    pub points: Vec<Point>,
    /// The longest console silences, longest first.
    pub console_gaps: Vec<ConsoleGap>,
    /// Bytes the guest printed on its console up to and including the marker line.
    pub console_bytes: usize,
}

/// `boot timeline: <name> at <ms> ms` from a wisp-vmm log line.
pub fn parse_log_line(text: &str) -> Option<(String, f64)> {
    let rest = &text[text.find("boot timeline: ")? + "boot timeline: ".len()..];
    let (name, rest) = rest.split_once(" at ")?;
    let ms = rest.trim().strip_suffix("ms")?.trim().parse().ok()?;
    Some((name.trim().to_string(), ms))
}

fn ms_since(start: Instant, t: Instant) -> f64 {
    t.saturating_duration_since(start).as_secs_f64() * 1e3
}

/// The time from the spawn to the VMM's own start (its milestones count from there):
/// the smallest gap between when the host read a `boot timeline:` log line and the time
/// the line itself gives.
pub fn exec_delay_ms(started: Instant, lines: &[Line]) -> anyhow::Result<f64> {
    Ok(lines
        .iter()
        .filter(|l| l.stream == Stream::Stderr)
        .filter_map(|l| parse_log_line(&l.text).map(|(_, at)| ms_since(started, l.at) - at))
        .reduce(f64::min)
        .context("wisp-vmm printed no `boot timeline:` log lines (is it run with --log-level info?)")?
        .max(0.0))
}

/// Builds one run's timeline from its timestamped output and the VMM's milestones
/// (name, ms since the VMM process started).
pub fn from_run(
    started: Instant,
    lines: &[Line],
    milestones: &[(String, f64)],
    marker: &str,
) -> anyhow::Result<Timeline> {
    let exec_ms = exec_delay_ms(started, lines)?;
    let console: Vec<&Line> =
        lines.iter().filter(|l| l.stream == Stream::Stdout && !l.text.trim().is_empty()).collect();
    let Some(marker_idx) = console.iter().position(|l| l.text.contains(marker)) else {
        bail!("the guest console never showed {marker:?}")
    };
    let marker_ms = ms_since(started, console[marker_idx].at);
    let mut points = vec![Point { name: SPAWN.into(), at_ms: 0.0 }];
    for (name, at) in milestones {
        if exec_ms + at <= marker_ms {
            points.push(Point { name: name.clone(), at_ms: exec_ms + at });
        }
    }
    if marker_idx > 0 {
        points.push(Point { name: FIRST_CONSOLE.into(), at_ms: ms_since(started, console[0].at) });
    }
    points.push(Point { name: MARKER.into(), at_ms: marker_ms });
    points.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));

    let vcpus_ms = points.iter().find(|p| p.name == "vcpus_started").map(|p| p.at_ms);
    let mut gaps = Vec::new();
    let mut prev: Option<(f64, &str)> = vcpus_ms.map(|ms| (ms, "(wisp-vmm: vcpus_started)"));
    for l in &console[..=marker_idx] {
        let at = ms_since(started, l.at);
        if let Some((p, after)) = prev {
            gaps.push(ConsoleGap { ms: (at - p).max(0.0), after: after.to_string(), before: l.text.clone() });
        }
        prev = Some((at, &l.text));
    }
    gaps.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    gaps.truncate(GAPS_KEPT);
    let console_bytes = lines
        .iter()
        .filter(|l| l.stream == Stream::Stdout && l.at <= console[marker_idx].at)
        .map(|l| l.text.len() + 1)
        .sum();
    Ok(Timeline { points, console_gaps: gaps, console_bytes })
}

/// What happens between two timeline points.
pub fn describe(from: &str, to: &str) -> &'static str {
    match (from, to) {
        (SPAWN, "process_start") => "fork/exec, dynamic loading, argument parsing",
        ("process_start", "kvm_ready") => "open /dev/kvm, create the VM and guest memory, irqchip, PIT",
        ("kvm_ready", "devices_ready") => "virtio-mmio devices and their backends (taps, sockets, shares)",
        ("devices_ready", "kernel_loaded") => "the kernel and initrd read into guest memory, vCPUs configured",
        ("kernel_loaded", "vcpus_started") => "vCPU threads started",
        ("vcpus_started", FIRST_CONSOLE) => "guest kernel until its first console line",
        (FIRST_CONSOLE, MARKER) => "guest kernel init (log on the serial console) until /init prints",
        ("vcpus_started", MARKER) => "guest kernel boot until /init prints",
        (FIRST_CONSOLE, "guest_userspace") => "guest kernel init (log on the serial console) until /init runs",
        ("vcpus_started", "guest_userspace") => "guest kernel boot until /init runs",
        ("guest_userspace", "agent_ready") => "agent as PID 1: mounts, cgroups, clock, vsock listeners",
        ("agent_ready", MARKER) => "agent's first log line reaches the host console",
        (MARKER, AGENT_ANSWERED) | ("agent_ready", AGENT_ANSWERED) => "host dials hybrid vsock, ttrpc Check answered",
        _ => "",
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PhaseSummary {
    pub from: String,
    pub to: String,
    pub ms: Summary,
    /// In how many runs this phase appeared.
    pub runs: usize,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TimelineSummary {
    pub runs: usize,
    pub phases: Vec<PhaseSummary>,
    /// Spawn to each run's last point.
    pub total: Summary,
    /// The last point of most runs: what `total` ends at.
    #[serde(default)]
    pub end: String,
    /// The longest console silences of the run with the median total.
    pub console_gaps: Vec<ConsoleGap>,
    /// Console bytes up to userspace, median.
    pub console_bytes: Option<Summary>,
}

impl TimelineSummary {
    /// The phase with the longest median.
    pub fn slowest(&self) -> Option<&PhaseSummary> {
        self.phases.iter().max_by(|a, b| a.ms.median.total_cmp(&b.ms.median))
    }
}

/// Medians of each phase (consecutive points) over the runs, in the first run's order.
pub fn summarize(runs: &[Timeline]) -> Option<TimelineSummary> {
    let mut keys: Vec<(String, String)> = Vec::new();
    let mut values: Vec<Vec<f64>> = Vec::new();
    for t in runs {
        for w in t.points.windows(2) {
            let key = (w[0].name.clone(), w[1].name.clone());
            let i = keys.iter().position(|k| *k == key).unwrap_or_else(|| {
                keys.push(key);
                values.push(Vec::new());
                keys.len() - 1
            });
            values[i].push(w[1].at_ms - w[0].at_ms);
        }
    }
    let totals: Vec<f64> = runs.iter().filter_map(|t| t.points.last().map(|p| p.at_ms)).collect();
    let total = Summary::of(&totals)?;
    let mut by_total: Vec<&Timeline> = runs.iter().collect();
    by_total.sort_by(|a, b| {
        let at = |t: &Timeline| t.points.last().map(|p| p.at_ms).unwrap_or(0.0);
        at(a).total_cmp(&at(b))
    });
    let median_run = by_total[by_total.len() / 2];
    let phases = keys
        .into_iter()
        .zip(values)
        .filter_map(|((from, to), v)| Some(PhaseSummary { from, to, ms: Summary::of(&v)?, runs: v.len() }))
        .collect();
    let bytes: Vec<f64> = runs.iter().map(|t| t.console_bytes as f64).collect();
    Some(TimelineSummary {
        runs: runs.len(),
        phases,
        total,
        end: most_common(runs.iter().filter_map(|t| t.points.last()).map(|p| p.name.as_str())),
        console_gaps: median_run.console_gaps.clone(),
        console_bytes: Summary::of(&bytes),
    })
}

/// The most frequent name (the first seen among equals); empty for none.
fn most_common<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for n in names {
        match counts.iter_mut().find(|(c, _)| *c == n) {
            Some((_, k)) => *k += 1,
            None => counts.push((n, 1)),
        }
    }
    let best = counts.iter().map(|(_, k)| *k).max().unwrap_or(0);
    counts.into_iter().find(|(_, k)| *k == best).map(|(n, _)| n.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line(start: Instant, ms: u64, stream: Stream, text: &str) -> Line {
        Line { at: start + Duration::from_millis(ms), stream, text: text.into() }
    }

    #[test]
    fn parses_the_vmm_log_line() {
        let l = "[  0.012345 INFO  main] boot timeline: kvm_ready at 3.250 ms";
        assert_eq!(parse_log_line(l), Some(("kvm_ready".to_string(), 3.25)));
        assert_eq!(parse_log_line("[ 0.1 INFO main] VM ended"), None);
        assert_eq!(parse_log_line("boot timeline: x at soon"), None);
    }

    fn run(start: Instant, exec: u64, marker: u64) -> Timeline {
        let lines = vec![
            line(start, exec + 1, Stream::Stderr, "[0.001 INFO main] boot timeline: process_start at 0.000 ms"),
            line(start, exec + 10, Stream::Stderr, "[0.010 INFO main] boot timeline: vcpus_started at 8.000 ms"),
            line(start, 100, Stream::Stdout, "Linux version 6.12"),
            line(start, 120, Stream::Stdout, "Run /init as init process"),
            line(start, marker, Stream::Stdout, "WISP-TEST-INIT-STARTED"),
        ];
        let ms = [("process_start".to_string(), 0.0), ("vcpus_started".to_string(), 8.0)];
        from_run(start, &lines, &ms, "WISP-TEST-INIT-STARTED").unwrap()
    }

    #[test]
    fn points_are_shifted_by_the_exec_delay_and_gaps_found() {
        let start = Instant::now();
        let t = run(start, 20, 900);
        let names: Vec<_> = t.points.iter().map(|p| (p.name.as_str(), p.at_ms.round())).collect();
        assert_eq!(
            names,
            [(SPAWN, 0.0), ("process_start", 21.0), ("vcpus_started", 29.0), (FIRST_CONSOLE, 100.0), (MARKER, 900.0)]
        );
        assert_eq!(t.console_gaps[0].before, "WISP-TEST-INIT-STARTED");
        assert_eq!(t.console_gaps[0].after, "Run /init as init process");
        assert_eq!(t.console_gaps[0].ms.round(), 780.0);
        assert_eq!(t.console_gaps[1].after, "(wisp-vmm: vcpus_started)");
        assert_eq!(t.console_bytes, "Linux version 6.12\nRun /init as init process\nWISP-TEST-INIT-STARTED\n".len());
    }

    #[test]
    fn no_log_lines_is_an_error() {
        let start = Instant::now();
        let lines = vec![line(start, 5, Stream::Stdout, "WISP-TEST-INIT-STARTED")];
        assert!(from_run(start, &lines, &[], "WISP-TEST-INIT-STARTED").is_err());
    }

    #[test]
    fn summary_takes_medians_per_phase_and_names_the_slowest() {
        let start = Instant::now();
        let runs = [run(start, 20, 900), run(start, 30, 1000), run(start, 10, 800)];
        let s = summarize(&runs).unwrap();
        assert_eq!(s.runs, 3);
        assert_eq!(s.total.median.round(), 900.0);
        assert_eq!(s.end, MARKER);
        assert_eq!(most_common(["a", "b", "b", "a", "c", "b"].into_iter()), "b");
        assert_eq!(most_common(["a", "b"].into_iter()), "a");
        assert_eq!(most_common(std::iter::empty()), "");
        assert!(s.phases.iter().all(|p| p.runs == 3));
        let slow = s.slowest().unwrap();
        assert_eq!((slow.from.as_str(), slow.to.as_str()), (FIRST_CONSOLE, MARKER));
        assert_eq!(slow.ms.median.round(), 800.0);
        assert_eq!(s.phases[0].ms.median.round(), 21.0);
        assert!(summarize(&[]).is_none());
    }
}
