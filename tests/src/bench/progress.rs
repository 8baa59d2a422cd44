//! What a benchmark run has finished so far (`progress.json` next to the report), so
//! that a run cut short by the emulated KVM host's death (an emulator fault, not a
//! wisp failure: see tests/README.md) goes on in a fresh host with `--resume` instead
//! of starting over. Kept: finished experiments, and the recorded pairs of the one the
//! host died in (it goes on from them after a new warm-up); an experiment whose
//! figures failed runs again whole. An experiment that was going on when
//! `MAX_HOSTS_LOST` hosts died is given up: its figures fail with that reason and what
//! its recorded pairs gave, and the experiments after it get their turn.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::timeline::Timeline;
use super::{Experiment, FigureResult, Outcome, Pairs, Part, RunPlan, Sample};

/// How many emulated hosts an experiment may take down before it is given up.
pub const MAX_HOSTS_LOST: u32 = 2;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub runs: usize,
    pub warmup: usize,
    pub experiments: Vec<Finished>,
    /// The experiment in progress and its recorded pairs.
    #[serde(default)]
    pub unfinished: Option<Unfinished>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Unfinished {
    pub experiment: String,
    pub wisp: Vec<StoredSample>,
    pub peer: Vec<StoredSample>,
    pub repeated: Vec<String>,
    /// How many runs (emulated hosts) ended while this experiment was going on.
    #[serde(default)]
    pub hosts_lost: u32,
}

/// A `Sample` with its figure names as strings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSample {
    pub values: Vec<(String, f64)>,
    pub timeline: Option<Timeline>,
    /// (figure, label, value)
    pub parts: Vec<(String, String, f64)>,
}

impl StoredSample {
    fn of(s: &Sample) -> Self {
        Self {
            values: s.values.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            timeline: s.timeline.clone(),
            parts: s.parts.iter().map(|p| (p.figure.to_string(), p.label.clone(), p.value)).collect(),
        }
    }

    /// Back to a `Sample` of `exp`; None when a name is not one of its figures.
    fn sample(&self, exp: &Experiment) -> Option<Sample> {
        let name = |n: &str| exp.figures.iter().map(|f| f.name).find(|f| *f == n);
        Some(Sample {
            values: self.values.iter().map(|(n, v)| Some((name(n)?, *v))).collect::<Option<_>>()?,
            timeline: self.timeline.clone(),
            parts: self
                .parts
                .iter()
                .map(|(f, label, value)| Some(Part { figure: name(f)?, label: label.clone(), value: *value }))
                .collect::<Option<_>>()?,
        })
    }
}

/// One finished experiment: each figure's outcome by name, and its wisp timelines.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finished {
    pub experiment: String,
    pub outcomes: Vec<(String, Outcome)>,
    pub timelines: Vec<Timeline>,
    /// Given up after `MAX_HOSTS_LOST` hosts died in it: final, failed figures and all.
    #[serde(default)]
    pub given_up: bool,
}

impl Progress {
    pub fn new(plan: &RunPlan) -> Self {
        Self { runs: plan.runs, warmup: plan.warmup, experiments: Vec::new(), unfinished: None }
    }

    /// The progress file at `path`; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> anyhow::Result<Option<Self>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_str(&text).map(Some).with_context(|| format!("{} is not a progress file", path.display()))
    }

    /// Written whole to a temporary file and renamed, so a run killed mid-write
    /// leaves the previous progress.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, path))
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn same_plan(&self, plan: &RunPlan) -> bool {
        self.runs == plan.runs && self.warmup == plan.warmup
    }

    /// Keeps the pairs `exp` has recorded so far.
    pub fn record_pairs(&mut self, exp: &Experiment, pairs: &Pairs) {
        let hosts_lost = self.hosts_lost(exp);
        self.unfinished = Some(Unfinished {
            experiment: exp.name.to_string(),
            wisp: pairs.wisp.iter().map(StoredSample::of).collect(),
            peer: pairs.peer.iter().map(StoredSample::of).collect(),
            repeated: pairs.repeated.clone(),
            hosts_lost,
        });
    }

    /// This progress is being resumed: the run that wrote it ended (its emulated host
    /// died) while its unfinished experiment was going on. Counted for that experiment,
    /// even if it had recorded no pair yet.
    pub fn resumed(&mut self, exps: &[Experiment]) {
        let next = exps.iter().find(|e| self.measured(e).is_none()).map(|e| e.name);
        match (&mut self.unfinished, next) {
            (Some(u), _) => u.hosts_lost += 1,
            (None, Some(name)) => {
                self.unfinished = Some(Unfinished {
                    experiment: name.to_string(),
                    wisp: Vec::new(),
                    peer: Vec::new(),
                    repeated: Vec::new(),
                    hosts_lost: 1,
                })
            }
            (None, None) => {}
        }
    }

    /// How many runs ended while `exp` was going on.
    pub fn hosts_lost(&self, exp: &Experiment) -> u32 {
        self.unfinished.as_ref().filter(|u| u.experiment == exp.name).map_or(0, |u| u.hosts_lost)
    }

    /// Gives `exp` up: each figure fails with `why`; final (`measured` returns it).
    pub fn give_up(&mut self, exp: &Experiment, results: &[FigureResult]) {
        self.record(exp, results, &[]);
        if let Some(f) = self.experiments.iter_mut().find(|f| f.experiment == exp.name) {
            f.given_up = true;
        }
    }

    /// The pairs `exp` recorded before the run was cut short (none if it was not the
    /// experiment in progress).
    pub fn pairs(&self, exp: &Experiment) -> Pairs {
        let Some(u) = self.unfinished.as_ref().filter(|u| u.experiment == exp.name) else {
            return Pairs::default();
        };
        let back = |v: &[StoredSample]| v.iter().map(|s| s.sample(exp)).collect::<Option<Vec<_>>>();
        match (back(&u.wisp), back(&u.peer)) {
            (Some(wisp), Some(peer)) => Pairs { wisp, peer, repeated: u.repeated.clone() },
            _ => Pairs::default(),
        }
    }

    /// Records `exp`'s results, replacing an earlier record of it.
    pub fn record(&mut self, exp: &Experiment, results: &[FigureResult], timelines: &[Timeline]) {
        self.unfinished = None;
        self.experiments.retain(|f| f.experiment != exp.name);
        self.experiments.push(Finished {
            experiment: exp.name.to_string(),
            outcomes: results.iter().map(|r| (r.spec.name.to_string(), r.outcome.clone())).collect(),
            timelines: timelines.to_vec(),
            given_up: false,
        });
    }

    /// `exp`'s earlier results, if it finished with every figure measured or was given up.
    pub fn measured(&self, exp: &Experiment) -> Option<(Vec<FigureResult>, Vec<Timeline>)> {
        let f = self.experiments.iter().find(|f| f.experiment == exp.name)?;
        let results = exp
            .figures
            .iter()
            .map(|spec| {
                let (_, outcome) = f.outcomes.iter().find(|(name, _)| name == spec.name)?;
                match outcome {
                    Outcome::Failed(_) if !f.given_up => None,
                    o => Some(FigureResult { spec: spec.clone(), outcome: o.clone() }),
                }
            })
            .collect::<Option<Vec<_>>>()?;
        Some((results, f.timelines.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::vms::Side;
    use crate::bench::{Ctx, FigureSpec, Sample, Target};

    fn never(_: &Ctx, _: Side) -> anyhow::Result<Sample> {
        anyhow::bail!("not run in this test")
    }

    fn exp(name: &'static str, figures: &[&'static str]) -> Experiment {
        Experiment {
            name,
            sides: ("a", "b"),
            run: never,
            figures: figures
                .iter()
                .map(|f| FigureSpec {
                    name: f,
                    unit: "ms",
                    peer_name: "peer",
                    target: Target::Report,
                    target_text: "report",
                    note: "",
                })
                .collect(),
        }
    }

    fn measured(v: f64) -> Outcome {
        Outcome::Measured { wisp: vec![v], peer: vec![2.0 * v], wisp_parts: Vec::new(), repeated: Vec::new() }
    }

    #[test]
    fn finished_experiments_survive_a_round_trip_and_failed_ones_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.json");
        let plan = RunPlan { runs: 5, warmup: 1 };
        let (boot, fs) = (exp("boot", &["boot_ms"]), exp("fs", &["fs_read", "fs_write"]));
        let mut p = Progress::new(&plan);
        let r = |spec: &FigureSpec, outcome| FigureResult { spec: spec.clone(), outcome };
        let timeline = Timeline { points: Vec::new(), console_gaps: Vec::new(), console_bytes: 7 };
        p.record(&boot, &[r(&boot.figures[0], measured(3.0))], std::slice::from_ref(&timeline));
        p.record(&fs, &[r(&fs.figures[0], measured(1.0)), r(&fs.figures[1], Outcome::Failed("boom".into()))], &[]);
        p.save(&path).unwrap();

        let back = Progress::load(&path).unwrap().unwrap();
        assert!(back.same_plan(&plan) && !back.same_plan(&RunPlan { runs: 3, warmup: 1 }));
        let (results, timelines) = back.measured(&boot).unwrap();
        assert_eq!(timelines, vec![timeline]);
        match &results[0].outcome {
            Outcome::Measured { wisp, peer, .. } => {
                assert_eq!((wisp.as_slice(), peer.as_slice()), (&[3.0][..], &[6.0][..]))
            }
            o => panic!("{o:?}"),
        }
        assert!(back.measured(&fs).is_none(), "an experiment with a failed figure runs again");
        assert!(back.measured(&exp("net", &["net_mbps"])).is_none());
        // A figure the experiment has now but did not have then: it runs again.
        assert!(back.measured(&exp("boot", &["boot_ms", "boot_new"])).is_none());
    }

    #[test]
    fn the_pairs_of_an_unfinished_experiment_are_kept_until_it_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.json");
        let plan = RunPlan { runs: 5, warmup: 1 };
        let (fs, other) = (exp("fs", &["fs_read", "fs_write"]), exp("net", &["net_mbps"]));
        let sample = |v: f64| Sample {
            values: vec![("fs_read", v), ("fs_write", v / 2.0)],
            timeline: None,
            parts: vec![Part { figure: "fs_read", label: "guest".into(), value: v }],
        };
        let mut p = Progress::new(&plan);
        p.record_pairs(&fs, &Pairs { wisp: vec![sample(4.0)], peer: vec![sample(8.0)], repeated: vec!["r".into()] });
        p.save(&path).unwrap();
        let back = Progress::load(&path).unwrap().unwrap();
        let pairs = back.pairs(&fs);
        assert_eq!((pairs.wisp.len(), pairs.peer.len(), pairs.repeated.len()), (1, 1, 1));
        assert_eq!(pairs.wisp[0].values, vec![("fs_read", 4.0), ("fs_write", 2.0)]);
        assert_eq!(pairs.peer[0].parts[0].value, 8.0);
        assert!(back.pairs(&other).wisp.is_empty());
        // Figures renamed since: nothing is kept.
        assert!(back.pairs(&exp("fs", &["fs_read_mb"])).wisp.is_empty());
        let mut done = back.clone();
        done.record(&fs, &[], &[]);
        assert!(done.pairs(&fs).wisp.is_empty());
    }

    #[test]
    fn an_experiment_in_which_two_hosts_died_is_given_up_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.json");
        let plan = RunPlan { runs: 5, warmup: 1 };
        let exps = [exp("boot", &["boot_ms"]), exp("par", &["par_ms"]), exp("net", &["net_mbps"])];
        let (boot, par, net) = (&exps[0], &exps[1], &exps[2]);
        let r = |spec: &FigureSpec, outcome| FigureResult { spec: spec.clone(), outcome };
        let mut p = Progress::new(&plan);
        p.record(boot, &[r(&boot.figures[0], measured(3.0))], &[]);
        // The host died in `par` before it recorded a pair: counted all the same.
        p.resumed(&exps);
        assert_eq!((p.hosts_lost(boot), p.hosts_lost(par), p.hosts_lost(net)), (0, 1, 0));
        let one = |v: f64| Sample { values: vec![("par_ms", v)], timeline: None, parts: Vec::new() };
        p.record_pairs(par, &Pairs { wisp: vec![one(1.0)], peer: vec![one(2.0)], repeated: Vec::new() });
        assert_eq!(p.hosts_lost(par), 1, "recording a pair keeps the count");
        p.save(&path).unwrap();
        let mut back = Progress::load(&path).unwrap().unwrap();
        back.resumed(&exps);
        assert_eq!(back.hosts_lost(par), MAX_HOSTS_LOST);

        let results = crate::bench::given_up(par, &back.pairs(par), back.hosts_lost(par));
        match &results[0].outcome {
            Outcome::Failed(why) => {
                assert!(why.contains("died 2 times") && why.contains("1 recorded pair(s)"), "{why}");
                assert!(why.contains("wisp 1.00 (1.00–1.00) ms, peer 2.00") && why.contains("ratio 0.50x"), "{why}");
            }
            o => panic!("{o:?}"),
        }
        back.give_up(par, &results);
        back.save(&path).unwrap();
        let mut again = Progress::load(&path).unwrap().unwrap();
        assert!(again.measured(par).is_some(), "a given-up experiment does not run again");
        // The next resume counts against the experiment after it.
        again.resumed(&exps);
        assert_eq!((again.hosts_lost(par), again.hosts_lost(net)), (0, 1));
        let none = crate::bench::given_up(net, &Pairs::default(), 2);
        assert!(matches!(&none[0].outcome, Outcome::Failed(w) if w.contains("recorded no pair")));
    }

    #[test]
    fn a_missing_file_is_no_progress_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Progress::load(&dir.path().join("none.json")).unwrap().is_none());
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{ not json").unwrap();
        assert!(Progress::load(&bad).is_err());
    }
}
