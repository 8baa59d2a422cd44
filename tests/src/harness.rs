//! A small test runner for tests that start processes, need root or KVM, or run inside
//! the emulated KVM host. Unlike libtest it can report a case as skipped with its
//! reason, and it ends with the plain summary line `NAME: N passed, N passed on a
//! rerun, N failed, N skipped` (`tests/e2e.sh` adds these up), after one line per
//! failed case (`NAME: FAILED case: first line`) and per skipped one (`NAME: SKIPPED
//! case: reason`).
//!
//! Usage in a `harness = false` test target:
//! ```ignore
//! fn main() { Suite::new("vmm").case("boots", boots).run() }
//! ```
//! Command-line arguments that do not start with `-` filter cases by substring.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// How a case ended when it did not fail.
#[derive(Debug)]
pub enum Outcome {
    Passed,
    Skipped(String),
}

pub type CaseResult = anyhow::Result<Outcome>;

type Case = (String, Box<dyn Fn() -> CaseResult>);

/// What a failure says when a nested guest triple-faulted (wisp-vmm's exit reason).
pub const TRIPLE_FAULT: &str = "GuestTripleFault";

/// Whether this runs inside the emulated KVM host (`tests/kvmhost/run` sets it).
pub fn in_emulated_host() -> bool {
    std::env::var_os("WISP_KVMHOST").is_some()
}
/// The first line of a guest kernel's console, and the line it prints as it starts /init.
const KERNEL_BANNER: &str = "Linux version ";
const KERNEL_STARTS_INIT: &str = "Run /init as init process";

/// What the shim says when a pod's guest agent never answered on vsock.
const AGENT_SILENT: &str = "the guest agent did not answer within";
/// What the shim says when a guest vsock port (the agent's, a stdio stream's) did not
/// accept a connection in time (`wisp_protocols::hybrid_vsock`).
const PORT_SILENT: &str = "not reachable within";
/// What the shim's agent call says when the agent took a request and never answered
/// within the RPC timeout (the ttrpc crate's words).
const RPC_SILENT: &str = "ttrpc err: Receive packet from Receiver timeout";

/// The exit status of a suite that stopped because its emulated host went sick: a case
/// and its rerun both failed with a nested-guest fault. `tests/e2e.sh` runs the suite
/// again in a fresh emulated host, as it does after the host's kernel died (123).
pub const SICK_HOST_STATUS: i32 = 122;

/// Whether a failed case runs once more: only inside the emulated KVM host (`emulated`),
/// and only when its failure shows one of the emulator's faults of a nested guest
/// (`kvmhost/README.md`): the guest triple-faulted; its kernel stalled during boot (the
/// console transcript in the failure has the kernel's banner but it never started
/// /init; its vCPU spins in KVM_RUN); it stalled right after starting /init (the
/// shim's agent timeout, with "Run /init" the console's last line: the agent prints
/// nothing until something fails); or a running guest stopped answering on vsock (a
/// stdio port not reachable, or an agent call unanswered; its vCPU thread was seen
/// running, not halted, in an idle pod). The stalls after boot were seen in the CI dry
/// run of 2026-12-06 (`cri`'s `pod_runs_in_its_own_vm`, `cri@2.4`'s
/// `containers_share_the_pod_vm`) and in stop 23's CI (all nine `cri` cases: the agent's
/// CreateContainer unanswered for 30 s, in one emulated host). An agent that hangs on
/// its own hangs on the rerun too, and a rerun is always reported.
fn rerun_after(failure: &str, emulated: bool) -> bool {
    let kernel_stalled = failure.contains(KERNEL_BANNER) && !failure.contains(KERNEL_STARTS_INIT);
    let guest_silent = stalled_after_init(failure) || failure.contains(PORT_SILENT) || failure.contains(RPC_SILENT);
    emulated && (failure.contains(TRIPLE_FAULT) || kernel_stalled || guest_silent)
}

/// The shim gave up on the agent and the guest console it quotes ends where the kernel
/// starts /init: containerd's log quotes the console's last lines in `msg="..."`, so
/// that line is the one that closes the quote (a carriage return shows as `?`).
fn stalled_after_init(failure: &str) -> bool {
    failure.contains(AGENT_SILENT)
        && failure.lines().any(|l| {
            l.trim_end()
                .strip_suffix('"')
                .is_some_and(|l| l.trim_end_matches(['\r', '?']).ends_with(KERNEL_STARTS_INIT))
        })
}

/// Whether `failure` shows one of the emulator's nested-boot faults (a triple fault, a
/// kernel stalled in boot or right after starting /init) and this runs inside the
/// emulated KVM host: what the runner
/// reruns a case for. A suite that repeats one step many times (`tests/soak.rs`) redoes
/// that step instead of the whole case, and counts it.
pub fn emulator_fault(failure: &str) -> bool {
    rerun_after(failure, in_emulated_host())
}

pub struct Suite {
    name: String,
    cases: Vec<Case>,
}

impl Suite {
    pub fn new(name: &str) -> Self {
        Self { name: name.into(), cases: Vec::new() }
    }

    pub fn case(mut self, name: &str, f: impl Fn() -> CaseResult + 'static) -> Self {
        self.cases.push((name.into(), Box::new(f)));
        self
    }

    /// Runs the cases (in order, one at a time) and exits: 0 if none failed, 1 if one
    /// did, `SICK_HOST_STATUS` if the emulated host went sick.
    pub fn run(self) -> ! {
        let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
        std::process::exit(self.run_cases(&filters, in_emulated_host()))
    }

    /// `run`'s work: the cases whose names contain one of `filters` (all if none), as
    /// inside the emulated host or not (`emulated`); returns the exit status.
    fn run_cases(self, filters: &[String], emulated: bool) -> i32 {
        let (mut passed, mut failed, mut skipped, mut rerun_passed) = (0, 0, 0, 0);
        let mut skips = Vec::new();
        let mut failures = Vec::new();
        let selected: Vec<Case> = self
            .cases
            .into_iter()
            .filter(|(n, _)| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str())))
            .collect();
        println!("running {} tests of suite {}", selected.len(), self.name);
        let mut reruns = Vec::new();
        // Set when a case and its rerun both met a nested-guest fault: the emulated host
        // itself is then the likelier cause (stop 23's CI: every case after the first
        // fault failed the same way), so the suite stops and asks for a fresh one.
        let mut sick: Option<String> = None;
        let mut not_run = Vec::new();
        for (name, f) in selected {
            if sick.is_some() {
                not_run.push(name);
                continue;
            }
            let t = Instant::now();
            let mut res = catch_unwind(AssertUnwindSafe(&f));
            // Inside the emulated KVM host, nested guests now and then triple-fault or stall
            // for the emulator's sake (tests/kvmhost/README.md): such a failure runs the
            // case once more, and says so. Anywhere else it is a failure.
            if let Ok(Err(e)) = &res {
                let first = format!("{e:#}");
                if rerun_after(&first, emulated) {
                    println!(
                        "test {name} ... a nested guest triple-faulted or stalled (emulated host); running it again"
                    );
                    reruns.push((name.clone(), first));
                    res = catch_unwind(AssertUnwindSafe(&f));
                    if let Ok(Err(e)) = &res {
                        let second = format!("{e:#}");
                        if rerun_after(&second, emulated) {
                            sick = Some(format!(
                                "{name} met a nested-guest fault on its run and on its rerun: {}",
                                first_line(&second)
                            ));
                        }
                    }
                }
            }
            let secs = t.elapsed().as_secs_f64();
            let was_rerun = reruns.last().is_some_and(|(n, _)| *n == name);
            match res {
                Ok(Ok(Outcome::Passed)) if was_rerun => {
                    rerun_passed += 1;
                    println!("test {name} ... ok on its rerun ({secs:.1}s)");
                }
                Ok(Ok(Outcome::Passed)) => {
                    passed += 1;
                    println!("test {name} ... ok ({secs:.1}s)");
                }
                Ok(Ok(Outcome::Skipped(why))) => {
                    skipped += 1;
                    println!("test {name} ... skipped: {why}");
                    skips.push((name, why));
                }
                Ok(Err(e)) => {
                    failed += 1;
                    let msg = format!("{e:#}");
                    // The reason's first line at once too: a run stopped before the
                    // summary (CI's time limit) still says why (stop 22's did not).
                    println!("test {name} ... FAILED ({secs:.1}s): {}", first_line(&msg));
                    failures.push((name, msg));
                }
                Err(p) => {
                    failed += 1;
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into());
                    println!("test {name} ... FAILED (panicked, {secs:.1}s): {}", first_line(&msg));
                    failures.push((name, msg));
                }
            }
        }
        for (name, msg) in &failures {
            println!("\n---- {name} ----\n{msg}");
        }
        for (name, msg) in &reruns {
            println!("\n---- {name}: the first run, rerun after a nested guest fault ----\n{msg}");
        }
        println!();
        // One line per failure, next to the summary: a log cut to its head and tail (as
        // CI shows it) still says what failed and why.
        for (name, msg) in &failures {
            println!("{}: FAILED {name}: {}", self.name, first_line(msg));
        }
        for (name, why) in &skips {
            println!("{}: SKIPPED {name}: {}", self.name, first_line(why));
        }
        if !reruns.is_empty() {
            println!("{}: {} case(s) rerun after a nested guest fault (listed above)", self.name, reruns.len());
        }
        if let Some(why) = &sick {
            // Cases not run count as failed: a summary that is the last word (the third
            // attempt) must not read better than the run was.
            for name in &not_run {
                println!("{}: FAILED {name}: not run: the emulated host went sick", self.name);
            }
            failed += not_run.len();
            println!("{}: the emulated host went sick: {why}; {} case(s) not run", self.name, not_run.len());
        }
        println!(
            "{}: {passed} passed, {rerun_passed} passed on a rerun, {failed} failed, {skipped} skipped",
            self.name
        );
        if sick.is_some() {
            SICK_HOST_STATUS
        } else if failed > 0 {
            1
        } else {
            0
        }
    }
}

/// A failure message's first line; a long one keeps its first 120 and last 240
/// characters, since the reason is often at its end, after a command line (stop 23's
/// nerdctl failure was cut before it).
fn first_line(msg: &str) -> String {
    const HEAD: usize = 120;
    const TAIL: usize = 240;
    let line = msg.lines().find(|l| !l.trim().is_empty()).unwrap_or("(no message)");
    let chars: Vec<char> = line.chars().collect();
    if chars.len() <= HEAD + TAIL {
        return line.to_string();
    }
    let head: String = chars[..HEAD].iter().collect();
    let tail: String = chars[chars.len() - TAIL..].iter().collect();
    format!("{head} […] {tail}")
}

/// Why a test needing root cannot run here, if it cannot.
pub fn need_root() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    (unsafe { libc::geteuid() } != 0).then(|| "needs root".to_string())
}

/// Why a test needing a usable /dev/kvm cannot run here, if it cannot.
pub fn need_kvm() -> Option<String> {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => None,
        Err(e) => Some(format!("needs /dev/kvm ({e})")),
    }
}

/// Why a test needing hardware-style KVM (a real guest kernel boots) cannot run here.
/// PVM (`kvm_pvm`) only runs PVM-built guests; such tests belong in the emulated KVM
/// host (`tests/kvmhost/run`).
pub fn need_full_kvm() -> Option<String> {
    if let Some(why) = need_kvm() {
        return Some(why);
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo.lines().any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm")));
    (!hw).then(|| "needs hardware-style KVM (vmx/svm); this host's KVM cannot boot a normal guest kernel: run inside tests/kvmhost/run".to_string())
}

#[macro_export]
macro_rules! skip_unless {
    ($($why:expr),+) => {
        $(if let Some(reason) = $why { return Ok($crate::harness::Outcome::Skipped(reason)); })+
    };
}

/// Fails the case with a message unless `cond` holds.
#[macro_export]
macro_rules! ensure_that {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond { anyhow::bail!($($msg)+); }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_summed_up_by_its_first_line() {
        assert_eq!(
            first_line("\nnerdctl [\"exec\"] exited 1: boom\n--- containerd log ---\n..."),
            "nerdctl [\"exec\"] exited 1: boom"
        );
        assert_eq!(first_line(""), "(no message)");
        let long = format!("{}{}{}", "h".repeat(120), "x".repeat(100), "t".repeat(240));
        assert_eq!(first_line(&long), format!("{} […] {}", "h".repeat(120), "t".repeat(240)));
        let fits = "y".repeat(360);
        assert_eq!(first_line(&fits), fits);
    }

    #[test]
    fn only_the_emulators_nested_boot_faults_in_the_emulated_host_earn_a_rerun() {
        let fault = "wisp-vmm[7]: VM ended: GuestTripleFault(\"vCPU 0: rip 0xfff0\")";
        assert!(rerun_after(fault, true));
        assert!(!rerun_after(fault, false), "on hardware KVM a triple fault is a failure");
        assert!(!rerun_after("wisp-vmm closed its output (exited with status 0)", true));
        assert!(!rerun_after("VM ended: GuestReset", true));

        let stalled = "wisp-vmm did not print \"listening\" within 180s; output so far:\n\
                       Linux version 6.12.117 (root@vm)\nsmpboot: Total of 1 processors activated\n";
        assert!(rerun_after(stalled, true));
        assert!(!rerun_after(stalled, false), "on hardware KVM a stalled boot is a failure");
        let booted = format!("{stalled}Run /init as init process\nvsock-probe: connect: refused\n");
        assert!(!rerun_after(&booted, true), "a guest that reached /init failed on its own");
        assert!(!rerun_after("did not print \"listening\" within 180s; output so far:\n", true));
    }

    #[test]
    fn a_guest_silent_since_it_started_init_earns_a_rerun_in_the_emulated_host_only() {
        // As containerd's log quotes it (CI dry run, 2026-12-06).
        let log = "CRI RunPodSandbox: Unknown: failed to create shim task: starting the pod's VM: \
                   the guest agent did not answer within 120.03s: guest port 1024: Resource temporarily unavailable\n\
                   time=\"...\" level=warn msg=\"sandbox 3c: last guest console lines:\n\
                   Freeing unused kernel image (initmem) memory: 804K?\n\
                   Run /init as init process?\"\n\
                   time=\"...\" level=info msg=\"shim disconnected\"\n";
        assert!(rerun_after(log, true));
        assert!(!rerun_after(log, false), "on hardware KVM a silent agent is a failure");
        // The guest printed something after /init started (an agent error, a panic): its
        // own failure, not a stall.
        let spoke = log.replace(
            "Run /init as init process?\"",
            "Run /init as init process?\nwisp-agent: fatal: mounting /proc: EPERM\"",
        );
        assert!(!rerun_after(&spoke, true));
        // The same console in another failure (the VM ended) is not the agent's silence.
        let ended = log.replace(AGENT_SILENT, "the VM ended before the agent answered");
        assert!(!rerun_after(&ended, true));
    }

    #[test]
    fn a_guest_port_that_stopped_answering_earns_a_rerun_in_the_emulated_host_only() {
        let exec = "CRI ExecSync: Internal: failed to exec in container: failed to start exec \"44c3\": \
                    stdio stream Stdout of 7910/44c3: guest port 1025 via /run/wisp/4530/vmm/vsock.sock: \
                    not reachable within 10.017s; last error: Resource temporarily unavailable (os error 11)";
        assert!(rerun_after(exec, true));
        assert!(!rerun_after(exec, false));
        assert!(!rerun_after("CRI ExecSync: exit 1, stdout \"\"", true), "a guest that answered failed on its own");
    }

    /// A suite of: a passing case, a case failing `fails` times with `failure` (then
    /// passing), and a last case; returns its status, how often the second and the last
    /// case ran.
    fn run_suite(failure: &'static str, fails: usize, emulated: bool) -> (i32, usize, usize) {
        use std::cell::Cell;
        use std::rc::Rc;
        let (second, last) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
        let (s, l) = (second.clone(), last.clone());
        let suite = Suite::new("selftest")
            .case("first", || Ok(Outcome::Passed))
            .case("second", move || {
                s.set(s.get() + 1);
                if s.get() <= fails {
                    anyhow::bail!("{failure}");
                }
                Ok(Outcome::Passed)
            })
            .case("last", move || {
                l.set(l.get() + 1);
                Ok(Outcome::Passed)
            });
        let status = suite.run_cases(&[], emulated);
        (status, second.get(), last.get())
    }

    const STALL: &str = "agent CreateContainer: ttrpc err: Receive packet from Receiver timeout: timed out";

    #[test]
    fn a_case_that_stalls_twice_in_the_emulated_host_stops_the_suite_as_a_sick_host() {
        // Stalls on its run and its rerun: the last case is not run, the status says sick.
        assert_eq!(run_suite(STALL, 2, true), (SICK_HOST_STATUS, 2, 0));
        // Stalls once: its rerun passes and the suite goes on.
        assert_eq!(run_suite(STALL, 1, true), (0, 2, 1));
        // On hardware KVM a stall is a plain failure: no rerun, no sick host.
        assert_eq!(run_suite(STALL, 2, false), (1, 1, 1));
        // A failure that is not a nested-guest fault is not rerun.
        assert_eq!(run_suite("exit status 3", 2, true), (1, 1, 1));
    }

    #[test]
    fn an_agent_call_left_unanswered_earns_a_rerun_in_the_emulated_host_only() {
        // Stop 23's CI, every case of `cri`.
        let create = "CRI RunPodSandbox: Unknown: failed to create containerd task: failed to create shim task: \
                      agent CreateContainer: ttrpc err: Receive packet from Receiver timeout: timed out waiting on channel: unknown";
        assert!(rerun_after(create, true));
        assert!(!rerun_after(create, false));
        let refused =
            "agent CreateContainer: ttrpc err: rpc status: Status { code: INVALID_ARGUMENT, message: \"bad spec\" }";
        assert!(!rerun_after(refused, true), "an agent that answered failed on its own");
    }
}
