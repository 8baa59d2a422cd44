//! What a benchmark run has finished so far (`progress.json` next to the report), so
//! that a run cut short by the emulated KVM host's death (an emulator fault, not a
//! wisp failure: see tests/README.md) goes on in a fresh host with `--resume` instead
//! of starting over. Kept per experiment: an experiment the host died in runs again
//! whole; one whose figures failed runs again too.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::timeline::Timeline;
use super::{Experiment, FigureResult, Outcome, RunPlan};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub runs: usize,
    pub warmup: usize,
    pub experiments: Vec<Finished>,
}

/// One finished experiment: each figure's outcome by name, and its wisp timelines.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finished {
    pub experiment: String,
    pub outcomes: Vec<(String, Outcome)>,
    pub timelines: Vec<Timeline>,
}

impl Progress {
    pub fn new(plan: &RunPlan) -> Self {
        Self { runs: plan.runs, warmup: plan.warmup, experiments: Vec::new() }
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

    /// Records `exp`'s results, replacing an earlier record of it.
    pub fn record(&mut self, exp: &Experiment, results: &[FigureResult], timelines: &[Timeline]) {
        self.experiments.retain(|f| f.experiment != exp.name);
        self.experiments.push(Finished {
            experiment: exp.name.to_string(),
            outcomes: results.iter().map(|r| (r.spec.name.to_string(), r.outcome.clone())).collect(),
            timelines: timelines.to_vec(),
        });
    }

    /// `exp`'s earlier results, if it finished with every figure measured.
    pub fn measured(&self, exp: &Experiment) -> Option<(Vec<FigureResult>, Vec<Timeline>)> {
        let f = self.experiments.iter().find(|f| f.experiment == exp.name)?;
        let results = exp
            .figures
            .iter()
            .map(|spec| {
                let (_, outcome) = f.outcomes.iter().find(|(name, _)| name == spec.name)?;
                match outcome {
                    Outcome::Failed(_) => None,
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
    fn a_missing_file_is_no_progress_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Progress::load(&dir.path().join("none.json")).unwrap().is_none());
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{ not json").unwrap();
        assert!(Progress::load(&bad).is_err());
    }
}
