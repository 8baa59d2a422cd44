//! `make bench`: wisp's figures against a peer measured in the same invocation.
//!
//! A figure comes from an *experiment*: one function that runs one VM (or pod) on one
//! side, wisp or the peer, and returns that run's values (a run can yield several
//! figures, e.g. a VMM's overhead and its guest's touched RAM from one smaps read).
//! The runner calls it N times per side, interleaved (wisp, peer, wisp, peer, ...) so
//! both sides see the same machine noise, and reports each figure as the median with
//! min and max. Figures that cannot be measured yet are listed with the reason, never
//! as numbers. Benchmarks never assert on time: a missed target is a report line.

pub mod figures;
pub mod json;
pub mod pods;
pub mod progress;
pub mod report;
pub mod restore;
pub mod smaps;
pub mod stats;
pub mod timed;
pub mod timeline;
pub mod vms;

use std::time::Duration;

use stats::Summary;
use timeline::Timeline;
use vms::{Setup, Side};

/// What a figure is held against (from the design's TARGETS.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// wisp / peer must be at most this.
    RatioAtMost(f64),
    /// wisp's own value must be at most this (in the figure's unit).
    WispAtMost(f64),
    /// Reported, not judged.
    Report,
}

/// A figure's identity and how it is judged.
#[derive(Debug, Clone)]
pub struct FigureSpec {
    pub name: &'static str,
    pub unit: &'static str,
    pub peer_name: &'static str,
    pub target: Target,
    /// The target as TARGETS.md states it.
    pub target_text: &'static str,
    /// A line for the report's notes (published anchors, how it is measured).
    pub note: &'static str,
}

/// The values of one run on one side, by figure name.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub values: Vec<(&'static str, f64)>,
    /// wisp-vmm's boot timeline of this run, when the experiment records it.
    pub timeline: Option<Timeline>,
    /// What a figure's value is made of (wisp side), e.g. memory by mapping.
    pub parts: Vec<Part>,
}

/// A labelled share of a figure's value in one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub figure: &'static str,
    pub label: String,
    pub value: f64,
}

/// Settings every experiment sees.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub setup: Setup,
    /// How long a booted guest idles before its VMM's memory is read.
    pub settle: Duration,
    pub boot_timeout: Duration,
    /// The containerd of the pod figures, started on first use.
    pub pods: std::sync::Arc<pods::PodEnvCell>,
}

pub type RunFn = fn(&Ctx, Side) -> anyhow::Result<Sample>;

/// One function measuring one or more figures.
pub struct Experiment {
    pub name: &'static str,
    /// What the two sides are, for progress lines: (wisp side, peer side).
    pub sides: (&'static str, &'static str),
    pub run: RunFn,
    pub figures: Vec<FigureSpec>,
}

/// How a figure came out.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    /// `wisp_parts`: the median of each part over the wisp runs, largest first.
    Measured {
        wisp: Vec<f64>,
        peer: Vec<f64>,
        wisp_parts: Vec<(String, Summary)>,
        /// Runs that failed and were repeated: which, and the first line of the error.
        repeated: Vec<String>,
    },
    Timeline(timeline::TimelineSummary),
    NotMeasured(String),
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct FigureResult {
    pub spec: FigureSpec,
    pub outcome: Outcome,
}

/// How many runs per side.
pub struct RunPlan {
    pub runs: usize,
    /// Unrecorded runs per side first (page cache, CPU frequency, lazy binding).
    pub warmup: usize,
}

/// How many failed runs an experiment may repeat before it fails; each one is listed
/// in the report with its error.
pub const MAX_REPEATS: usize = 2;

/// The recorded runs of an experiment so far, as interleaved pairs (`wisp[i]` and
/// `peer[i]`), and the failed runs that were repeated.
#[derive(Debug, Clone, Default)]
pub struct Pairs {
    pub wisp: Vec<Sample>,
    pub peer: Vec<Sample>,
    pub repeated: Vec<String>,
}

/// Runs `exp` `plan.runs` times per side, interleaved, and returns its figures'
/// results plus the wisp-side timelines it recorded. A failed run is repeated (at most
/// `MAX_REPEATS` times per experiment, each reported); after that the experiment's
/// figures fail with the error (the remaining runs are skipped).
pub fn run_experiment(exp: &Experiment, ctx: &Ctx, plan: &RunPlan) -> (Vec<FigureResult>, Vec<Timeline>) {
    run_experiment_from(exp, ctx, plan, Pairs::default(), &mut |_| {})
}

/// `run_experiment` going on from the pairs an earlier, interrupted run recorded
/// (after its own warm-up: a fresh host has cold caches); `on_pair` sees the pairs
/// after each new one, to keep them.
pub fn run_experiment_from(
    exp: &Experiment,
    ctx: &Ctx,
    plan: &RunPlan,
    start: Pairs,
    on_pair: &mut dyn FnMut(&Pairs),
) -> (Vec<FigureResult>, Vec<Timeline>) {
    let done = start.wisp.len().min(start.peer.len()).min(plan.runs);
    let Pairs { mut wisp, mut peer, mut repeated } = start;
    wisp.truncate(done);
    peer.truncate(done);
    let mut error = None;
    let total = plan.warmup + plan.runs;
    let runs = (0..plan.warmup).chain(plan.warmup + done..total);
    'runs: for i in runs {
        let warm = i < plan.warmup;
        for side in [Side::Wisp, Side::Peer] {
            let label = if warm { "warm-up".to_string() } else { format!("run {}/{}", i - plan.warmup + 1, plan.runs) };
            let side_name = match side {
                Side::Wisp => exp.sides.0,
                Side::Peer => exp.sides.1,
            };
            let mut attempt = (exp.run)(ctx, side);
            while let Err(e) = &attempt {
                if repeated.len() >= MAX_REPEATS {
                    break;
                }
                eprintln!("bench: {} {side_name} {label} failed, repeating it: {e:#}", exp.name);
                repeated.push(format!("{side_name} {label}: {}", format!("{e:#}").lines().next().unwrap_or_default()));
                attempt = (exp.run)(ctx, side);
            }
            match attempt {
                Ok(s) => {
                    let vals: Vec<String> = s.values.iter().map(|(n, v)| format!("{n}={v:.2}")).collect();
                    eprintln!("bench: {} {side_name} {label}: {}", exp.name, vals.join(" "));
                    if !warm {
                        if side == Side::Wisp {
                            wisp.push(s)
                        } else {
                            peer.push(s);
                            let pairs = Pairs { wisp, peer, repeated };
                            on_pair(&pairs);
                            (wisp, peer, repeated) = (pairs.wisp, pairs.peer, pairs.repeated);
                        }
                    }
                }
                Err(e) => {
                    eprintln!("bench: {} {side_name} {label} failed: {e:#}", exp.name);
                    error = Some(format!("{side_name} {label}: {e:#}"));
                    break 'runs;
                }
            }
        }
    }
    let results = exp
        .figures
        .iter()
        .map(|spec| {
            let outcome = match &error {
                // The table shows the first line: what the recorded pairs gave goes there.
                Some(e) => {
                    let (first, rest) = e.split_once('\n').unwrap_or((e.as_str(), ""));
                    let rest = if rest.is_empty() { String::new() } else { format!("\n{rest}") };
                    Outcome::Failed(format!("{first}; {}{rest}", recorded(spec, &wisp, &peer)))
                }
                None => Outcome::Measured {
                    wisp: values_of(&wisp, spec.name),
                    peer: values_of(&peer, spec.name),
                    wisp_parts: parts_of(&wisp, spec.name),
                    repeated: repeated.clone(),
                },
            };
            FigureResult { spec: spec.clone(), outcome }
        })
        .collect();
    let timelines = if error.is_none() { wisp.into_iter().filter_map(|s| s.timeline).collect() } else { Vec::new() };
    (results, timelines)
}

/// The figures of `exp` once it is given up after `hosts` emulated hosts died while it
/// ran: each fails, saying so and what the pairs it had recorded gave.
pub fn given_up(exp: &Experiment, pairs: &Pairs, hosts: u32) -> Vec<FigureResult> {
    exp.figures
        .iter()
        .map(|spec| {
            let why = format!(
                "the emulated host died {hosts} times while it ran (an emulator fault under nested load); \
                 given up so that the experiments after it could run; {}",
                recorded(spec, &pairs.wisp, &pairs.peer)
            );
            FigureResult { spec: spec.clone(), outcome: Outcome::Failed(why) }
        })
        .collect()
}

/// What the complete pairs recorded for `spec` give: medians and their ratio.
fn recorded(spec: &FigureSpec, wisp: &[Sample], peer: &[Sample]) -> String {
    let n = wisp.len().min(peer.len());
    let (w, p) = (values_of(&wisp[..n], spec.name), values_of(&peer[..n], spec.name));
    let summary = |s: Summary| format!("{:.2} ({:.2}–{:.2}) {}", s.median, s.min, s.max, spec.unit);
    match (Summary::of(&w), Summary::of(&p)) {
        (Some(ws), Some(ps)) => {
            let ratio = if ps.median > 0.0 { format!(", ratio {:.2}x", ws.median / ps.median) } else { String::new() };
            format!("its {n} recorded pair(s): wisp {}, {} {}{ratio}", summary(ws), spec.peer_name, summary(ps))
        }
        _ => "it had recorded no pair".into(),
    }
}

fn values_of(samples: &[Sample], name: &str) -> Vec<f64> {
    samples.iter().flat_map(|s| s.values.iter().filter(|(n, _)| *n == name).map(|(_, v)| *v)).collect()
}

/// Per label, the median over the runs (a run without the label counts as 0).
fn parts_of(samples: &[Sample], figure: &str) -> Vec<(String, Summary)> {
    let mut labels: Vec<&str> = Vec::new();
    for p in samples.iter().flat_map(|s| &s.parts).filter(|p| p.figure == figure) {
        if !labels.contains(&p.label.as_str()) {
            labels.push(&p.label);
        }
    }
    let mut out: Vec<(String, Summary)> = labels
        .into_iter()
        .filter_map(|label| {
            let per_run: Vec<f64> = samples
                .iter()
                .map(|s| s.parts.iter().filter(|p| p.figure == figure && p.label == label).map(|p| p.value).sum())
                .collect();
            Some((label.to_string(), Summary::of(&per_run)?))
        })
        .collect();
    out.sort_by(|a, b| b.1.median.total_cmp(&a.1.median));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx {
        Ctx {
            setup: Setup {
                vmm: "/v".into(),
                kernel: "/k".into(),
                initrd: "/i".into(),
                agent_initrd: "/a".into(),
                qemu: "/q".into(),
            },
            settle: Duration::ZERO,
            boot_timeout: Duration::ZERO,
            pods: pods::PodEnvCell::new(),
        }
    }

    fn spec(name: &'static str) -> FigureSpec {
        FigureSpec { name, unit: "ms", peer_name: "peer", target: Target::Report, target_text: "", note: "" }
    }

    thread_local! {
        static ORDER: std::cell::RefCell<Vec<Side>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn counting(_: &Ctx, side: Side) -> anyhow::Result<Sample> {
        let n = ORDER.with(|o| {
            o.borrow_mut().push(side);
            o.borrow().len()
        });
        Ok(Sample { values: vec![("a", n as f64), ("b", 1.0)], ..Default::default() })
    }

    #[test]
    fn runs_are_interleaved_and_warmups_dropped() {
        let exp = Experiment { name: "x", sides: ("w", "p"), run: counting, figures: vec![spec("a"), spec("b")] };
        let (res, _) = run_experiment(&exp, &ctx(), &RunPlan { runs: 3, warmup: 1 });
        let order = ORDER.with(|o| o.borrow().clone());
        assert_eq!(order, [Side::Wisp, Side::Peer].repeat(4));
        match &res[0].outcome {
            Outcome::Measured { wisp, peer, .. } => {
                assert_eq!(wisp, &[3.0, 5.0, 7.0]);
                assert_eq!(peer, &[4.0, 6.0, 8.0]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&res[1].outcome, Outcome::Measured { wisp, .. } if wisp.len() == 3));
    }

    #[test]
    fn an_interrupted_experiment_goes_on_from_its_pairs() {
        let exp = Experiment { name: "x", sides: ("w", "p"), run: counting, figures: vec![spec("a")] };
        let s = |v: f64| Sample { values: vec![("a", v)], ..Default::default() };
        let start =
            Pairs { wisp: vec![s(100.0), s(102.0)], peer: vec![s(101.0)], repeated: vec!["w run 1/3: x".into()] };
        let mut seen = Vec::new();
        let (res, _) = run_experiment_from(&exp, &ctx(), &RunPlan { runs: 3, warmup: 1 }, start, &mut |p| {
            seen.push((p.wisp.len(), p.peer.len()))
        });
        // One pair was whole; the warm-up pair, then runs 2 and 3 follow.
        assert_eq!(ORDER.with(|o| o.borrow().len()), 6);
        assert_eq!(seen, [(2, 2), (3, 3)]);
        match &res[0].outcome {
            Outcome::Measured { wisp, peer, repeated, .. } => {
                assert_eq!((wisp[0], peer[0]), (100.0, 101.0));
                assert_eq!((wisp.len(), peer.len(), repeated.len()), (3, 3, 1));
            }
            other => panic!("{other:?}"),
        }
    }

    fn failing(_: &Ctx, side: Side) -> anyhow::Result<Sample> {
        match side {
            Side::Wisp => Ok(Sample { values: vec![("a", 1.0)], ..Default::default() }),
            Side::Peer => anyhow::bail!("peer broke"),
        }
    }

    #[test]
    fn a_failed_run_fails_the_figures_with_its_error() {
        let exp = Experiment { name: "x", sides: ("w", "p"), run: failing, figures: vec![spec("a")] };
        let (res, _) = run_experiment(&exp, &ctx(), &RunPlan { runs: 3, warmup: 0 });
        assert!(matches!(&res[0].outcome, Outcome::Failed(e) if e.contains("peer broke")), "{:?}", res[0].outcome);
        assert!(matches!(&res[0].outcome, Outcome::Failed(e) if e.contains("recorded no pair")));
    }

    static PEER_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// The peer's third and later runs fail.
    fn peer_fails_late(_: &Ctx, side: Side) -> anyhow::Result<Sample> {
        let v = match side {
            Side::Wisp => 1.0,
            Side::Peer if PEER_CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 2 => {
                anyhow::bail!("host gone\nits console: ...")
            }
            Side::Peer => 2.0,
        };
        Ok(Sample { values: vec![("a", v)], ..Default::default() })
    }

    #[test]
    fn a_failure_after_some_pairs_says_what_they_gave_on_its_first_line() {
        let exp = Experiment { name: "x", sides: ("w", "p"), run: peer_fails_late, figures: vec![spec("a")] };
        let (res, _) = run_experiment(&exp, &ctx(), &RunPlan { runs: 5, warmup: 0 });
        let Outcome::Failed(e) = &res[0].outcome else { panic!("{:?}", res[0].outcome) };
        let first = e.lines().next().unwrap();
        assert!(
            first.contains("host gone; its 2 recorded pair(s): wisp 1.00") && first.ends_with("ratio 0.50x"),
            "{e}"
        );
        assert!(e.ends_with("\nits console: ..."), "{e}");
    }
}
