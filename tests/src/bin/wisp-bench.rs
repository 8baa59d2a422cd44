//! `wisp-bench`: runs wisp's benchmarks (see `wisp_tests::bench`) and writes
//! `target/bench/report.md` and `target/bench/report.json`. Needs hardware-style KVM:
//! `tests/bench.sh` (or `make bench`) runs it inside the emulated KVM host.
//!
//!   wisp-bench [--runs N] [--warmup N] [--settle SECS] [--boot-timeout SECS] [--out DIR] [--resume] [FILTER...]
//!
//! FILTERs select experiments or figures by name: experiments `boot`, `boot_agent`,
//! `idle_memory`, `shared_fs`, `confinement_boot`, `ctr_run`, `confinement`, `cri_lifecycle`, `idle_pod`,
//! `parallel_start`, `net`;
//! figures as in the report;
//! `boot_timeline` comes from `boot_agent`.
//! Exit status: 0 when every selected figure was measured (whether or not it met its
//! target), 1 when a measurement failed, 2 for usage errors and missing prerequisites.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use wisp_tests::artifact;
use wisp_tests::bench::figures::{boot_timeline_spec, experiments, not_yet_measured};
use wisp_tests::bench::pods::PodEnvCell;
use wisp_tests::bench::progress::{Progress, MAX_HOSTS_LOST};
use wisp_tests::bench::timeline::{summarize, Timeline};
use wisp_tests::bench::vms::Setup;
use wisp_tests::bench::{given_up, report, run_experiment_from, Ctx, Experiment, FigureResult, Outcome, RunPlan};

const USAGE: &str =
    "usage: wisp-bench [--runs N] [--warmup N] [--settle SECS] [--boot-timeout SECS] [--out DIR] [--resume] [FILTER...]
  --runs N            runs per side and figure (default: $WISP_BENCH_N or 5)
  --warmup N          unrecorded runs per side before them (default 1)
  --settle SECS       idle time after boot before memory is read (default 3)
  --boot-timeout SECS give up on a boot after this long (default 120)
  --out DIR           where report.md and report.json go (default target/bench)
  --resume            keep the experiments an earlier run with the same --runs and
                      --warmup finished (DIR/progress.json); run the rest. The one that
                      run ended in is counted; after 2 such ends it is given up
  FILTER              only these experiments or figures (names as in the report; the
                      experiments are `boot`, `boot_agent`, `idle_memory`, `shared_fs`,
                      `ctr_run`, `cri_lifecycle`, `idle_pod`, `parallel_start` and `net`)";

struct Args {
    runs: usize,
    warmup: usize,
    settle: Duration,
    boot_timeout: Duration,
    out: PathBuf,
    resume: bool,
    filters: Vec<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let runs = match std::env::var("WISP_BENCH_N") {
        Ok(v) => v.parse().with_context(|| format!("WISP_BENCH_N={v:?} is not a count"))?,
        Err(_) => 5,
    };
    let mut a = Args {
        runs,
        warmup: 1,
        settle: Duration::from_secs(3),
        boot_timeout: Duration::from_secs(120),
        out: artifact("bench"),
        resume: false,
        filters: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next()).with_context(|| format!("{flag} needs a value"));
        let count = |v: String| v.parse::<u64>().with_context(|| format!("{flag} {v:?}: not a whole number"));
        match flag.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "-n" | "--runs" => a.runs = count(value()?)? as usize,
            "--warmup" => a.warmup = count(value()?)? as usize,
            "--settle" => a.settle = Duration::from_secs(count(value()?)?),
            "--boot-timeout" => a.boot_timeout = Duration::from_secs(count(value()?)?),
            "--out" => a.out = PathBuf::from(value()?),
            "--resume" => a.resume = true,
            f if f.starts_with('-') => bail!("unknown option {f}"),
            _ => a.filters.push(arg),
        }
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let known = known_names();
    if let Some(f) = a.filters.iter().find(|f| !known.contains(&f.as_str())) {
        bail!("no experiment or figure is called {f:?}; known: {}", known.join(", "));
    }
    Ok(a)
}

fn selected(filters: &[String], names: &[&str]) -> bool {
    filters.is_empty() || filters.iter().any(|f| names.contains(&f.as_str()))
}

/// Every name a FILTER can be.
fn known_names() -> Vec<&'static str> {
    let mut names = vec!["boot_timeline"];
    for e in experiments() {
        names.push(e.name);
        names.extend(e.figures.iter().map(|f| f.name));
    }
    names.extend(not_yet_measured().iter().map(|(f, _)| f.name));
    names
}

fn where_measured() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let host = if std::env::var_os("WISP_KVMHOST").is_some() {
        "inside the emulated KVM host (tests/kvmhost/run: QEMU TCG + nested KVM; absolute times are 10-30x hardware)"
    } else {
        "directly on this host's KVM"
    };
    format!("Measured {host}; kernel {}, {cpus} CPUs.", kernel.trim())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("wisp-bench: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let setup = match Setup::find() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wisp-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let ctx = Ctx { setup, settle: args.settle, boot_timeout: args.boot_timeout, pods: PodEnvCell::new() };
    let plan = RunPlan { runs: args.runs, warmup: args.warmup };
    let exps: Vec<Experiment> = experiments().into_iter().filter(|e| selected(&args.filters, &names_of(e))).collect();

    // The report is rewritten after each experiment, so that a run cut short (the
    // emulated host's time limit) still leaves what was measured.
    let progress_file = args.out.join("progress.json");
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        eprintln!("wisp-bench: creating {}: {e}", args.out.display());
        return ExitCode::from(2);
    }
    let mut progress = match earlier_progress(&args, &plan, &progress_file) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("wisp-bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    if args.resume {
        // Saved at once: the host may die again before the experiment records a pair.
        progress.resumed(&exps);
        if let Err(e) = progress.save(&progress_file) {
            eprintln!("wisp-bench: {e:#}");
            return ExitCode::from(1);
        }
    }
    let mut done: Vec<Done> = Vec::new();
    for exp in &exps {
        let hosts_lost = progress.hosts_lost(exp);
        let (results, timelines) = match progress.measured(exp) {
            Some(kept) => {
                eprintln!("bench: {}: measured by the run this one resumes, kept", exp.name);
                kept
            }
            None if hosts_lost >= MAX_HOSTS_LOST => {
                eprintln!("bench: {}: the emulated host died {hosts_lost} times while it ran; given up", exp.name);
                let results = given_up(exp, &progress.pairs(exp), hosts_lost);
                progress.give_up(exp, &results);
                if let Err(e) = progress.save(&progress_file) {
                    eprintln!("wisp-bench: {e:#}");
                    return ExitCode::from(1);
                }
                (results, Vec::new())
            }
            None => {
                eprintln!("bench: {} ({} runs per side, interleaved, {} warm-up)", exp.name, plan.runs, plan.warmup);
                let start = progress.pairs(exp);
                if !start.wisp.is_empty() {
                    eprintln!(
                        "bench: {}: {} pair(s) recorded by the run this one resumes, kept; going on after a warm-up",
                        exp.name,
                        start.wisp.len().min(start.peer.len())
                    );
                }
                let (results, timelines) = run_experiment_from(exp, &ctx, &plan, start, &mut |pairs| {
                    progress.record_pairs(exp, pairs);
                    if let Err(e) = progress.save(&progress_file) {
                        eprintln!("wisp-bench: {e:#}");
                    }
                });
                progress.record(exp, &results, &timelines);
                if let Err(e) = progress.save(&progress_file) {
                    eprintln!("wisp-bench: {e:#}");
                    return ExitCode::from(1);
                }
                (results, timelines)
            }
        };
        done.push(Done { results, timelines });
        let partial = assemble(&exps, &done, &args.filters);
        if let Err(e) =
            write_report(&args.out, &report::markdown(&partial, plan.runs, plan.warmup, &where_measured()), &partial)
        {
            eprintln!("wisp-bench: {e:#}");
            return ExitCode::from(1);
        }
    }
    let results = assemble(&exps, &done, &args.filters);
    let md = report::markdown(&results, plan.runs, plan.warmup, &where_measured());
    println!("\n{md}");
    if let Err(e) = write_report(&args.out, &md, &results) {
        eprintln!("wisp-bench: {e:#}");
        return ExitCode::from(1);
    }
    eprintln!("bench: wrote {0}/report.md and {0}/report.json", args.out.display());
    if results.iter().any(|r| matches!(r.outcome, Outcome::Failed(_))) {
        eprintln!("bench: some figures could not be measured (see the table)");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// The progress to go on from: the earlier run's with `--resume` (if it had the same
/// plan), else none.
fn earlier_progress(args: &Args, plan: &RunPlan, file: &Path) -> anyhow::Result<Progress> {
    if !args.resume {
        return Ok(Progress::new(plan));
    }
    match Progress::load(file)? {
        Some(p) if p.same_plan(plan) => Ok(p),
        Some(p) => {
            eprintln!(
                "bench: {} is for {} runs and {} warm-up, not {} and {}: starting over",
                file.display(),
                p.runs,
                p.warmup,
                plan.runs,
                plan.warmup
            );
            Ok(Progress::new(plan))
        }
        None => {
            eprintln!("bench: nothing to resume ({} does not exist)", file.display());
            Ok(Progress::new(plan))
        }
    }
}

/// What a finished experiment gave.
struct Done {
    results: Vec<FigureResult>,
    timelines: Vec<Timeline>,
}

/// The experiment that records wisp-vmm's boot timeline.
const TIMELINE_EXPERIMENT: &str = "boot_agent";

fn names_of(e: &Experiment) -> Vec<&'static str> {
    let mut names: Vec<&str> = e.figures.iter().map(|f| f.name).collect();
    names.push(e.name);
    if e.name == TIMELINE_EXPERIMENT {
        names.push("boot_timeline");
    }
    names
}

/// The report's rows: the finished experiments' figures (the boot timeline right
/// after the boot figure it explains), the selected experiments that did not run,
/// then the figures not measurable yet.
fn assemble(exps: &[Experiment], done: &[Done], filters: &[String]) -> Vec<FigureResult> {
    let mut results: Vec<FigureResult> = Vec::new();
    let mut timeline = None;
    for (i, exp) in exps.iter().enumerate() {
        let res: Vec<FigureResult> = match done.get(i) {
            Some(d) => d.results.clone(),
            None => exp
                .figures
                .iter()
                .map(|spec| FigureResult {
                    spec: spec.clone(),
                    outcome: Outcome::Failed("not run: the benchmark stopped before it".into()),
                })
                .collect(),
        };
        if exp.name == TIMELINE_EXPERIMENT {
            let failed = res.iter().find_map(|r| match &r.outcome {
                Outcome::Failed(e) => Some(e.clone()),
                _ => None,
            });
            let timelines = done.get(i).map(|d| d.timelines.as_slice()).unwrap_or_default();
            timeline = Some(match (failed, summarize(timelines)) {
                (Some(e), _) => Outcome::Failed(e),
                (None, Some(t)) => Outcome::Timeline(t),
                (None, None) => Outcome::Failed("no wisp-vmm run recorded a boot timeline".into()),
            });
        }
        results.extend(res);
    }
    if let Some(outcome) = timeline {
        let at = results.iter().position(|r| r.spec.name == "boot_to_userspace").map_or(0, |i| i + 1);
        results.insert(at, FigureResult { spec: boot_timeline_spec(), outcome });
    }
    for (spec, why) in not_yet_measured() {
        if selected(filters, &[spec.name]) {
            results.push(FigureResult { spec, outcome: Outcome::NotMeasured(why.into()) });
        }
    }
    results
}

fn write_report(out: &Path, md: &str, results: &[FigureResult]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)
        .and_then(|_| std::fs::write(out.join("report.md"), format!("# wisp benchmarks\n\n{md}")))
        .and_then(|_| std::fs::write(out.join("report.json"), report::json(results).pretty()))
        .with_context(|| format!("writing the report to {}", out.display()))
}
