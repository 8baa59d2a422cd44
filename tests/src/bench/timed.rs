//! A benchmarked child process whose output lines are timestamped as they arrive.
//! Unlike `process::Watched`, the time of a line is taken by the reader thread when the
//! line's last byte is read, not when a waiter wakes up, so a busy machine delays the
//! benchmark's bookkeeping but not the figure; and every line keeps its time, which
//! gives the boot's phases from the console. The child is killed when this is dropped
//! and, through PR_SET_PDEATHSIG, when the benchmark itself dies.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One line of output (without its newline) and when it arrived.
#[derive(Debug, Clone)]
pub struct Line {
    pub at: Instant,
    pub stream: Stream,
    pub text: String,
}

#[derive(Default)]
struct Output {
    lines: Vec<Line>,
    closed: usize,
}

pub struct TimedChild {
    child: Child,
    name: String,
    /// Taken just before the process was spawned.
    pub started: Instant,
    out: Arc<(Mutex<Output>, Condvar)>,
}

impl TimedChild {
    /// Starts `cmd` with stdin closed and stdout and stderr captured line by line.
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        let out = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        let pipes: Vec<(Stream, Box<dyn Read + Send>)> = vec![
            (Stream::Stdout, Box::new(child.stdout.take().context("stdout")?)),
            (Stream::Stderr, Box::new(child.stderr.take().context("stderr")?)),
        ];
        for (stream, pipe) in pipes {
            let out = out.clone();
            std::thread::spawn(move || read_lines(stream, pipe, &out));
        }
        Ok(Self { child, name: name.into(), started, out })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> Vec<Line> {
        self.out.0.lock().unwrap_or_else(|e| e.into_inner()).lines.clone()
    }

    /// All output so far, for error messages.
    pub fn transcript(&self) -> String {
        self.lines().iter().map(|l| format!("{}\n", l.text)).collect()
    }

    /// Waits for the first line containing `needle`; returns when it arrived.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> anyhow::Result<Instant> {
        self.wait_until(needle, |l| l.contains(needle), timeout)
    }

    /// Waits for the first line that is `marker` alone (surrounding white space aside):
    /// for markers a guest prints, which its console also shows inside the echoed
    /// kernel command line.
    pub fn wait_for_line(&self, marker: &str, timeout: Duration) -> anyhow::Result<Instant> {
        self.wait_until(marker, |l| l.trim() == marker, timeout)
    }

    fn wait_until(&self, needle: &str, matches: impl Fn(&str) -> bool, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.out;
        let mut o = lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = 0;
        loop {
            if let Some(l) = o.lines[seen..].iter().find(|l| matches(&l.text)) {
                return Ok(l.at);
            }
            seen = o.lines.len();
            let now = Instant::now();
            if o.closed == 2 {
                drop(o);
                bail!("{} ended without printing {needle:?}; its output:\n{}", self.name, self.transcript());
            }
            if now >= deadline {
                drop(o);
                bail!("{} did not print {needle:?} within {timeout:?}; its output:\n{}", self.name, self.transcript());
            }
            o = cv.wait_timeout(o, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Waits for the process to end; kills it at the deadline and says so.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.stop()?;
                bail!("{} did not exit within {timeout:?} (killed)", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then reaps it: when this returns Ok, the process and its memory are
    /// gone. A process that outlives SIGKILL is stuck in the kernel: the error says
    /// where (each thread's state, wait channel and kernel stack) instead of hanging.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(_)) = self.child.try_wait() {
            return Ok(());
        }
        let _ = self.child.kill();
        let deadline = Instant::now() + REAP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!(
            "{} (pid {}) is still there {REAP_TIMEOUT:?} after SIGKILL, stuck in the kernel:\n{}",
            self.name,
            self.child.id(),
            kernel_state(self.child.id())
        )
    }
}

/// How long a killed process gets to disappear.
const REAP_TIMEOUT: Duration = Duration::from_secs(30);

/// Each thread of `pid`: name, state, wait channel, kernel stack (root only).
fn kernel_state(pid: u32) -> String {
    let task_dir = format!("/proc/{pid}/task");
    let Ok(tasks) = std::fs::read_dir(&task_dir) else { return format!("({task_dir} is gone)") };
    let mut out = String::new();
    for t in tasks.flatten() {
        let dir = t.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let stat = read("stat");
        // The state is the field after the parenthesised name.
        let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.split_whitespace().next()).unwrap_or("?");
        out.push_str(&format!(
            "  thread {} {:?} state {state} wchan {}\n",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim()
        ));
        for frame in read("stack").lines() {
            out.push_str(&format!("      {frame}\n"));
        }
    }
    out
}

impl Drop for TimedChild {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("bench: {e:#}");
        }
    }
}

fn read_lines(stream: Stream, mut pipe: Box<dyn Read + Send>, out: &(Mutex<Output>, Condvar)) {
    let mut buf = [0u8; 8192];
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let n = pipe.read(&mut buf).unwrap_or(0);
        let at = Instant::now();
        let (lock, cv) = out;
        let mut o = lock.lock().unwrap_or_else(|e| e.into_inner());
        if n == 0 {
            if !partial.is_empty() {
                let text = String::from_utf8_lossy(&partial).trim_end_matches('\r').to_string();
                o.lines.push(Line { at, stream, text });
            }
            o.closed += 1;
            cv.notify_all();
            return;
        }
        partial.extend_from_slice(&buf[..n]);
        while let Some(pos) = partial.iter().position(|&b| b == b'\n') {
            let rest = partial.split_off(pos + 1);
            let text = String::from_utf8_lossy(&partial[..pos]).trim_end_matches('\r').to_string();
            o.lines.push(Line { at, stream, text });
            partial = rest;
        }
        cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_timestamped_and_waited_for() {
        let mut c =
            TimedChild::spawn("sh", Command::new("sh").args(["-c", "echo one; echo two >&2; printf three"])).unwrap();
        let at = c.wait_for("two", Duration::from_secs(10)).unwrap();
        assert!(at >= c.started);
        c.wait_exit(Duration::from_secs(10)).unwrap();
        let err = c.wait_for("never", Duration::from_secs(10)).unwrap_err();
        assert!(format!("{err}").contains("ended without"), "{err}");
        let lines = c.lines();
        let texts: Vec<_> = lines.iter().map(|l| (l.stream, l.text.as_str())).collect();
        assert!(texts.contains(&(Stream::Stdout, "one")) && texts.contains(&(Stream::Stdout, "three")), "{texts:?}");
        assert!(texts.contains(&(Stream::Stderr, "two")), "{texts:?}");
    }

    #[test]
    fn markers_match_whole_lines_only() {
        let script = "echo 'cmdline: echo MARK-B && echo MARK-E'; echo MARK-B; echo ' MARK-E'";
        let c = TimedChild::spawn("sh", Command::new("sh").args(["-c", script])).unwrap();
        // The child's exit does not mean its output has been read: wait for the lines
        // first; everything printed before the last marker is in by then.
        let begin = c.wait_for_line("MARK-B", Duration::from_secs(10)).unwrap();
        let end = c.wait_for_line("MARK-E", Duration::from_secs(10)).unwrap();
        let lines = c.lines();
        let at = |text: &str| lines.iter().find(|l| l.text.trim() == text).map(|l| l.at).unwrap();
        assert_eq!((begin, end), (at("MARK-B"), at("MARK-E")));
        // wait_for takes the first line containing the text: the echoed command line.
        assert_eq!(c.wait_for("MARK-E", Duration::from_secs(10)).unwrap(), lines[0].at);
        assert!(c.wait_for_line("cmdline:", Duration::from_secs(1)).is_err(), "not a whole line");
    }

    #[test]
    fn dropping_kills_the_child() {
        let c = TimedChild::spawn("sleep", Command::new("sleep").arg("600")).unwrap();
        let pid = c.pid() as libc::pid_t;
        drop(c);
        // SAFETY: signal 0 only checks whether the (reaped) pid still exists.
        assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "the child outlived its TimedChild");
    }
}
