//! The benchmark report: a Markdown table (printed, and written to
//! `target/bench/report.md`) and the same figures with their raw samples as JSON
//! (`target/bench/report.json`, an array of one object per figure).

use std::fmt::Write;

use super::json::Json;
use super::stats::Summary;
use super::timeline::{describe, TimelineSummary};
use super::{FigureResult, FigureSpec, Outcome, Target};

/// A figure's verdict against its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// Reported, not judged.
    Info,
}

impl Verdict {
    fn text(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::Info => "info",
        }
    }
}

/// The medians and ratio of a measured figure, and its verdict.
#[derive(Debug, Clone, Copy)]
pub struct Judged {
    pub wisp: Summary,
    pub peer: Option<Summary>,
    pub ratio: Option<f64>,
    /// wisp_i / peer_i over the interleaved pairs: less sensitive to slow drifts of
    /// the machine than the ratio of the medians.
    pub pair_ratio: Option<Summary>,
    pub verdict: Verdict,
}

/// wisp_i / peer_i for each interleaved pair (runs i of both sides).
pub fn pair_ratios(wisp: &[f64], peer: &[f64]) -> Vec<f64> {
    wisp.iter().zip(peer).filter(|(_, p)| **p > 0.0).map(|(w, p)| w / p).collect()
}

pub fn judge(spec: &FigureSpec, wisp: &[f64], peer: &[f64]) -> Option<Judged> {
    let w = Summary::of(wisp)?;
    let p = Summary::of(peer);
    let ratio = p.filter(|p| p.median > 0.0).map(|p| w.median / p.median);
    let verdict = match spec.target {
        Target::RatioAtMost(max) => match ratio {
            Some(r) if r <= max => Verdict::Pass,
            _ => Verdict::Fail,
        },
        Target::WispAtMost(max) if w.median <= max => Verdict::Pass,
        Target::WispAtMost(_) => Verdict::Fail,
        Target::Report => Verdict::Info,
    };
    Some(Judged { wisp: w, peer: p, ratio, pair_ratio: Summary::of(&pair_ratios(wisp, peer)), verdict })
}

/// How a unit's values are printed.
fn decimals(unit: &str) -> usize {
    match unit {
        "ms" => 0,
        _ => 2,
    }
}

fn cell(s: &Summary, unit: &str) -> String {
    let d = decimals(unit);
    format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max)
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// The Markdown report: the table, the notes, then the boot timeline in detail.
pub fn markdown(results: &[FigureResult], runs: usize, warmup: usize, context: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "| figure | unit | wisp | peer | ratio | target | result |");
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |");
    let mut timeline = None;
    for r in results {
        let s = &r.spec;
        let (wisp, peer, ratio, result) = match &r.outcome {
            Outcome::Measured { wisp, peer, .. } => match judge(s, wisp, peer) {
                Some(j) => (
                    cell(&j.wisp, s.unit),
                    j.peer.map(|p| format!("{} {}", cell(&p, s.unit), s.peer_name)).unwrap_or_else(|| "—".into()),
                    j.ratio.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "—".into()),
                    j.verdict.text().to_string(),
                ),
                None => ("—".into(), "—".into(), "—".into(), "failed: no samples".into()),
            },
            Outcome::Timeline(t) => {
                timeline = Some(t);
                let slow = t
                    .slowest()
                    .map(|p| format!("info: slowest phase {} → {} ({:.0} ms)", p.from, p.to, p.ms.median))
                    .unwrap_or_else(|| "info".into());
                (format!("{} to {}", cell(&t.total, s.unit), t.end), "—".into(), "—".into(), slow)
            }
            Outcome::NotMeasured(why) => ("—".into(), "—".into(), "—".into(), format!("not measured: {why}")),
            Outcome::Failed(e) => ("—".into(), "—".into(), "—".into(), format!("failed: {}", first_line(e))),
        };
        let _ = writeln!(md, "| {} | {} | {wisp} | {peer} | {ratio} | {} | {result} |", s.name, s.unit, s.target_text);
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "Cells: median (min–max) of {runs} runs per side, wisp and peer interleaved in one invocation \
         ({warmup} unrecorded warm-up run(s) per side first). Ratio = wisp median / peer median. {context}"
    );
    for r in results {
        if !r.spec.note.is_empty() {
            let _ = writeln!(md, "- `{}`: {}", r.spec.name, r.spec.note);
        }
        if let (Outcome::Measured { wisp, peer, .. }, Target::RatioAtMost(_)) = (&r.outcome, r.spec.target) {
            if let Some(p) = judge(&r.spec, wisp, peer).and_then(|j| j.pair_ratio) {
                let _ = writeln!(
                    md,
                    "  Per interleaved pair, wisp/peer: median {:.2}x ({:.2}x–{:.2}x).",
                    p.median, p.min, p.max
                );
            }
        }
    }
    for r in results {
        if let Outcome::Measured { repeated, .. } = &r.outcome {
            for why in repeated {
                let _ = writeln!(md, "- `{}`: a run failed and was repeated: {why}", r.spec.name);
            }
        }
    }
    for r in results {
        if let Outcome::Measured { wisp_parts, .. } = &r.outcome {
            if !wisp_parts.is_empty() {
                let _ = writeln!(md, "\n`{}` of wisp, by part ({}, median):\n", r.spec.name, r.spec.unit);
                for (label, v) in wisp_parts {
                    let _ = writeln!(md, "- {label}: {}", cell(v, r.spec.unit));
                }
            }
        }
    }
    if let Some(t) = timeline {
        md.push_str(&timeline_markdown(t));
    }
    md
}

fn timeline_markdown(t: &TimelineSummary) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "\n### boot_timeline: wisp-vmm, median of {} runs (ms since the VMM was spawned)\n", t.runs);
    let _ = writeln!(md, "| phase | what | ms (min–max) | share |");
    let _ = writeln!(md, "| --- | --- | --- | --- |");
    for p in &t.phases {
        let share = if t.total.median > 0.0 { 100.0 * p.ms.median / t.total.median } else { 0.0 };
        let mut what = describe(&p.from, &p.to).to_string();
        if p.runs < t.runs {
            what.push_str(&format!(" (in {} of {} runs)", p.runs, t.runs));
        }
        let _ = writeln!(
            md,
            "| {} → {} | {what} | {:.1} ({:.1}–{:.1}) | {share:.0}% |",
            p.from, p.to, p.ms.median, p.ms.min, p.ms.max
        );
    }
    let _ = writeln!(md, "| total | spawn → {} | {} | 100% |", t.end, cell(&t.total, "ms"));
    if t.phases.iter().any(|p| p.runs < t.runs) {
        // Points are ordered by when the host saw them: a console line is timed when the
        // host reads it, which can be after a later event (the agent's answer over vsock).
        let _ = writeln!(
            md,
            "\nA phase seen in only some runs: the points came in another order in the others (a console \
             line is timed when the host reads it, which can be after the agent's answer over vsock)."
        );
    }
    if let Some(p) = t.slowest() {
        let _ = writeln!(
            md,
            "\nSlowest phase: **{} → {}** ({}), {:.0} ms median.",
            p.from,
            p.to,
            describe(&p.from, &p.to),
            p.ms.median
        );
    }
    if let Some(b) = t.console_bytes {
        let _ = writeln!(
            md,
            "\nThe guest printed {:.0} bytes on its serial console before userspace; every byte is a trapped \
             port write (a VM exit) on both VMMs.",
            b.median
        );
    }
    if !t.console_gaps.is_empty() {
        let _ = writeln!(md, "\nLongest silences on the guest console (median run):\n");
        for g in &t.console_gaps {
            let _ = writeln!(md, "- {:.0} ms after `{}`, before `{}`", g.ms, g.after.trim(), g.before.trim());
        }
    }
    md
}

fn target_json(t: Target) -> (Json, Json) {
    match t {
        Target::RatioAtMost(x) => (Json::str("ratio_at_most"), Json::Num(x)),
        Target::WispAtMost(x) => (Json::str("wisp_at_most"), Json::Num(x)),
        Target::Report => (Json::str("report"), Json::Null),
    }
}

fn summary_json(s: Option<Summary>) -> Json {
    match s {
        Some(s) => {
            Json::obj(vec![("median", Json::Num(s.median)), ("min", Json::Num(s.min)), ("max", Json::Num(s.max))])
        }
        None => Json::Null,
    }
}

/// One JSON object per figure: name, unit, wisp, peer, peer_name, ratio, n, target,
/// result, the raw samples, and the reason when it was not measured.
pub fn json(results: &[FigureResult]) -> Json {
    Json::Arr(results.iter().map(figure_json).collect())
}

fn figure_json(r: &FigureResult) -> Json {
    let s = &r.spec;
    let (kind, value) = target_json(s.target);
    let mut f = vec![
        ("name", Json::str(s.name)),
        ("unit", Json::str(s.unit)),
        ("peer_name", if s.peer_name == "—" { Json::Null } else { Json::str(s.peer_name) }),
        ("target", Json::str(s.target_text)),
        ("target_kind", kind),
        ("target_value", value),
    ];
    match &r.outcome {
        Outcome::Measured { wisp, peer, wisp_parts, repeated } => {
            let j = judge(s, wisp, peer);
            let parts = wisp_parts
                .iter()
                .map(|(label, v)| Json::obj(vec![("label", Json::str(label)), ("stats", summary_json(Some(*v)))]))
                .collect();
            f.extend([
                ("wisp", Json::opt_num(j.map(|j| j.wisp.median))),
                ("peer", Json::opt_num(j.and_then(|j| j.peer).map(|p| p.median))),
                ("ratio", Json::opt_num(j.and_then(|j| j.ratio))),
                ("n", Json::Num(wisp.len() as f64)),
                ("result", Json::str(j.map(|j| j.verdict.text().to_lowercase()).unwrap_or_else(|| "failed".into()))),
                ("wisp_stats", summary_json(j.map(|j| j.wisp))),
                ("peer_stats", summary_json(j.and_then(|j| j.peer))),
                ("wisp_samples", Json::nums(wisp)),
                ("peer_samples", Json::nums(peer)),
                ("pair_ratios", Json::nums(&pair_ratios(wisp, peer))),
                ("pair_ratio_median", Json::opt_num(j.and_then(|j| j.pair_ratio).map(|p| p.median))),
                ("wisp_parts", Json::Arr(parts)),
                ("repeated_runs", Json::Arr(repeated.iter().map(Json::str).collect())),
            ]);
        }
        Outcome::Timeline(t) => {
            let phases = t
                .phases
                .iter()
                .map(|p| {
                    Json::obj(vec![
                        ("from", Json::str(&p.from)),
                        ("to", Json::str(&p.to)),
                        ("what", Json::str(describe(&p.from, &p.to))),
                        ("ms", summary_json(Some(p.ms))),
                        ("runs", Json::Num(p.runs as f64)),
                    ])
                })
                .collect();
            let gaps = t
                .console_gaps
                .iter()
                .map(|g| {
                    Json::obj(vec![
                        ("ms", Json::Num(g.ms)),
                        ("after", Json::str(&g.after)),
                        ("before", Json::str(&g.before)),
                    ])
                })
                .collect();
            let slowest = t.slowest().map(|p| Json::str(format!("{} -> {}", p.from, p.to))).unwrap_or(Json::Null);
            f.extend([
                ("wisp", Json::Num(t.total.median)),
                ("peer", Json::Null),
                ("ratio", Json::Null),
                ("n", Json::Num(t.runs as f64)),
                ("result", Json::str("info")),
                ("wisp_stats", summary_json(Some(t.total))),
                ("total_ends_at", Json::str(&t.end)),
                ("slowest_phase", slowest),
                ("phases", Json::Arr(phases)),
                ("console_gaps", Json::Arr(gaps)),
                ("console_bytes", Json::opt_num(t.console_bytes.map(|b| b.median))),
            ]);
        }
        Outcome::NotMeasured(why) | Outcome::Failed(why) => {
            let result = if matches!(r.outcome, Outcome::Failed(_)) { "failed" } else { "not measured" };
            f.extend([
                ("wisp", Json::Null),
                ("peer", Json::Null),
                ("ratio", Json::Null),
                ("n", Json::Num(0.0)),
                ("result", Json::str(result)),
                ("reason", Json::str(why)),
                ("wisp_samples", Json::Arr(vec![])),
                ("peer_samples", Json::Arr(vec![])),
            ]);
        }
    }
    Json::obj(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(target: Target) -> FigureSpec {
        FigureSpec { name: "boot", unit: "ms", peer_name: "QEMU", target, target_text: "<= 0.5x QEMU", note: "" }
    }

    #[test]
    fn ratio_and_absolute_targets_are_judged_on_medians() {
        let j = judge(&spec(Target::RatioAtMost(0.5)), &[100.0, 40.0, 45.0], &[100.0, 90.0, 200.0]).unwrap();
        assert_eq!(j.ratio, Some(0.45));
        assert_eq!(j.pair_ratio.map(|p| (p.median, p.min, p.max)), Some((40.0 / 90.0, 0.225, 1.0)));
        assert_eq!(j.verdict, Verdict::Pass);
        let j = judge(&spec(Target::RatioAtMost(0.5)), &[60.0], &[100.0]).unwrap();
        assert_eq!(j.verdict, Verdict::Fail);
        assert_eq!(judge(&spec(Target::WispAtMost(2.0)), &[1.9], &[40.0]).unwrap().verdict, Verdict::Pass);
        assert_eq!(judge(&spec(Target::WispAtMost(2.0)), &[2.1], &[]).unwrap().verdict, Verdict::Fail);
        assert_eq!(judge(&spec(Target::Report), &[7.0], &[1.0]).unwrap().verdict, Verdict::Info);
        assert!(judge(&spec(Target::Report), &[], &[1.0]).is_none());
    }

    #[test]
    fn unmeasured_figures_are_rows_with_a_reason_never_numbers() {
        let results = vec![
            FigureResult {
                spec: spec(Target::RatioAtMost(0.5)),
                outcome: Outcome::Measured {
                    wisp: vec![40.0, 50.0],
                    peer: vec![100.0, 100.0],
                    wisp_parts: vec![],
                    repeated: vec![],
                },
            },
            FigureResult { spec: spec(Target::Report), outcome: Outcome::NotMeasured("needs the shim".into()) },
            FigureResult { spec: spec(Target::Report), outcome: Outcome::Failed("boom\nmore".into()) },
        ];
        let md = markdown(&results, 2, 0, "");
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| boot")).collect();
        assert_eq!(rows[0], "| boot | ms | 45 (40–50) | 100 (100–100) QEMU | 0.45x | <= 0.5x QEMU | pass |");
        assert_eq!(rows[1], "| boot | ms | — | — | — | <= 0.5x QEMU | not measured: needs the shim |");
        assert_eq!(rows[2], "| boot | ms | — | — | — | <= 0.5x QEMU | failed: boom |");
        let j = json(&results).pretty();
        assert!(j.contains("\"ratio\": 0.45") && j.contains("\"wisp_samples\": [40, 50]"), "{j}");
        assert!(j.contains("\"result\": \"not measured\"") && j.contains("\"reason\": \"needs the shim\""), "{j}");
    }
}
