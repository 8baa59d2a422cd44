//! Running a child process under test: its stdout and stderr are collected in the
//! background so a test can wait for a line to appear, and a child that outlives its
//! test is killed (never left behind).

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

#[derive(Default)]
struct Output {
    text: String,
    closed: usize,
}

pub struct Watched {
    child: Child,
    out: Arc<(Mutex<Output>, Condvar)>,
    name: String,
}

impl Watched {
    /// Starts `cmd` with stdout and stderr captured (interleaved, as read).
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let out = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        let pipes: Vec<Box<dyn Read + Send>> =
            vec![Box::new(child.stdout.take().context("stdout")?), Box::new(child.stderr.take().context("stderr")?)];
        for mut pipe in pipes {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    let n = pipe.read(&mut buf).unwrap_or(0);
                    let (lock, cv) = &*out;
                    let mut o = lock.lock().unwrap();
                    if n == 0 {
                        o.closed += 1;
                        cv.notify_all();
                        return;
                    }
                    o.text.push_str(&String::from_utf8_lossy(&buf[..n]));
                    cv.notify_all();
                }
            });
        }
        Ok(Self { child, out, name: name.into() })
    }

    pub fn output(&self) -> String {
        self.out.0.lock().unwrap().text.clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the output contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.out;
        let mut o = lock.lock().unwrap();
        loop {
            if o.text.contains(needle) {
                return Ok(());
            }
            let now = Instant::now();
            if o.closed == 2 {
                let text = o.text.clone();
                drop(o);
                bail!(
                    "{} closed its output ({}) {:.1?} into a wait for {needle:?}; its output:\n{text}",
                    self.name,
                    self.exit_description(),
                    timeout - (deadline - now)
                );
            }
            if now >= deadline {
                let text = o.text.clone();
                drop(o);
                bail!(
                    "{} did not print {needle:?} within {timeout:?}; its threads:\n{}output so far:\n{text}",
                    self.name,
                    thread_report(self.child.id())
                );
            }
            o = cv.wait_timeout(o, deadline - now).unwrap().0;
        }
    }

    /// How the child ended, without reaping it ("still running" if it has not).
    fn exit_description(&self) -> String {
        // The pipes close a moment before the exit is visible.
        for _ in 0..50 {
            // SAFETY: waitid on our own child, with WNOWAIT: it stays reapable.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    self.child.id() as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            if rc != 0 {
                return format!("exit unknown: {}", std::io::Error::last_os_error());
            }
            // SAFETY: waitid filled the siginfo (si_pid 0 means not exited yet).
            let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
            if pid != 0 {
                return match info.si_code {
                    libc::CLD_EXITED => format!("exited with status {status}"),
                    _ => format!("killed by signal {status}"),
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        "still running".into()
    }

    /// Waits for the exit and for all output; kills the child at the deadline.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                let (lock, cv) = &*self.out;
                let mut o = lock.lock().unwrap();
                while o.closed < 2 && Instant::now() < deadline + Duration::from_secs(5) {
                    o = cv.wait_timeout(o, Duration::from_millis(100)).unwrap().0;
                }
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not exit within {timeout:?} (killed); output:\n{}", self.name, self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` to completion with `stdin` fed to it, killing it after `timeout`.
pub fn output_within(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<std::process::Output> {
    use std::io::Write;
    let mut child = cmd
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning")?;
    if let (Some(data), Some(mut s)) = (stdin, child.stdin.take()) {
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = s.write_all(&data);
        });
    }
    let mut out_pipe = child.stdout.take().context("stdout")?;
    let mut err_pipe = child.stderr.take().context("stderr")?;
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_t.join().unwrap_or_default();
            let stderr = err_t.join().unwrap_or_default();
            bail!(
                "{cmd:?} did not finish within {timeout:?} (killed); stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(std::process::Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

/// Each thread of process `pid`: name, scheduler state, kernel wait channel and CPU time,
/// sampled twice a second apart (what a stuck child is doing: spinning, blocked, waiting).
pub fn thread_report(pid: u32) -> String {
    let sample = || -> Vec<(String, String)> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
        let mut rows: Vec<(String, String)> = tasks
            .flatten()
            .map(|t| {
                let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
                let stat = read("stat");
                // Fields after the parenthesised name: state is the 3rd, utime/stime the 14th/15th.
                let rest: Vec<&str> =
                    stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
                let field = |n: usize| rest.get(n - 3).copied().unwrap_or("?").to_string();
                let tid = t.file_name().to_string_lossy().into_owned();
                let row = format!(
                    "{} {:<16} state {} wchan {:<24} utime {} stime {}",
                    tid,
                    read("comm").trim(),
                    field(3),
                    read("wchan").trim(),
                    field(14),
                    field(15)
                );
                (tid, row)
            })
            .collect();
        rows.sort();
        rows
    };
    let first = sample();
    std::thread::sleep(Duration::from_secs(1));
    let second = sample();
    let mut out = String::new();
    for (label, rows) in [("", &first), ("1 s later: ", &second)] {
        for (_, row) in rows.iter() {
            out.push_str(&format!("  {label}{row}\n"));
        }
    }
    if out.is_empty() {
        out.push_str("  (none readable)\n");
    }
    // Debugging aid: WISP_TEST_GDB=1 adds every thread's backtrace.
    if std::env::var_os("WISP_TEST_GDB").is_some() {
        if let Ok(o) = std::process::Command::new("gdb")
            .args(["-p", &pid.to_string(), "-batch", "-ex", "thread apply all bt 20"])
            .stdin(std::process::Stdio::null())
            .output()
        {
            out.push_str(&String::from_utf8_lossy(&o.stdout));
        }
    }
    out
}
