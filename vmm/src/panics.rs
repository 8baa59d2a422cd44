//! A panic in a VM thread ends the VM. The device thread serves every virtio device and
//! each vCPU thread runs its vCPU: if one of them panicked and simply ended, the VMM
//! would keep running a VM with dead devices or a stuck vCPU, and the shim (which waits
//! for the VMM's exit) would never learn. So their bodies run under `report_panics`,
//! which turns a panic into `VmExit::ThreadPanicked` on the VM's exit channel; the main
//! thread then ends the process with status 1 and a one-line reason.
//!
//! `install_hook` replaces the standard panic message (several lines, and a backtrace
//! capture when `RUST_BACKTRACE` is set, whose file accesses the threads' seccomp lists
//! do not allow) with one line on stderr naming the thread and the source location.

use std::any::Any;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::Sender;

use crate::VmExit;

/// Runs `body`; if it panics, sends `VmExit::ThreadPanicked` naming `thread` on `exits`
/// (the panic does not go further: the thread then ends normally).
pub fn report_panics(thread: &str, exits: &Sender<VmExit>, body: impl FnOnce()) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(body)) {
        let _ = exits.send(VmExit::ThreadPanicked { thread: thread.to_string(), message: payload_text(&*payload) });
    }
}

/// The panic message: the `&str` or `String` given to `panic!`, on one line.
fn payload_text(payload: &(dyn Any + Send)) -> String {
    let text = if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.as_str()
    } else {
        "(no message)"
    };
    one_line(text)
}

/// `s` with line breaks and other control characters replaced, so it stays one line.
pub fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// Replaces the standard panic hook with one that writes a single line:
/// `wisp-vmm: thread 'NAME' panicked at FILE:LINE:COL: MESSAGE`. Only `write(2)` on
/// stderr, allowed in every thread's seccomp list.
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("?");
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| one_line(s))
            .or_else(|| info.payload().downcast_ref::<String>().map(|s| one_line(s)))
            .unwrap_or_else(|| "(no message)".into());
        let at = info.location().map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column())).unwrap_or_default();
        let _ = writeln!(std::io::stderr(), "wisp-vmm: thread '{name}' panicked{at}: {message}");
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn a_panicking_thread_reports_the_exit_with_status_1() {
        let (tx, rx) = channel();
        let t = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || report_panics("device", &tx, || panic!("queue {} went\nwrong", 3)))
            .unwrap();
        // The panic stops at `report_panics`: the thread itself ends normally.
        assert!(t.join().is_ok());
        let exit = rx.recv().unwrap();
        assert_eq!(exit, VmExit::ThreadPanicked { thread: "device".into(), message: "queue 3 went wrong".into() });
        assert_eq!(exit.exit_code(), 1);
    }

    const UNDER_SECCOMP: &str = "WISP_TEST_PANIC_UNDER_SECCOMP";

    /// The whole panic path (the hook, unwinding, the report) under the device and vCPU
    /// threads' seccomp filters: a call outside them would kill the VMM with SIGSYS
    /// instead of the status-1 exit. Runs in a fresh process (this test binary again,
    /// for this one test), with RUST_BACKTRACE set to show no backtrace is captured.
    #[test]
    fn the_panic_path_stays_within_the_thread_filters() {
        use crate::seccomp::ThreadKind;
        if let Some(kind) = std::env::var(UNDER_SECCOMP).ok().and_then(|k| ThreadKind::parse(&k)) {
            install_hook();
            let t = std::thread::spawn(move || {
                if crate::seccomp::install(kind).is_err() {
                    // SAFETY: ends the test process; exit_group is in every list.
                    unsafe { libc::_exit(2) };
                }
                let (tx, rx) = channel();
                report_panics("device", &tx, || panic!("under seccomp"));
                let ok =
                    matches!(rx.try_recv(), Ok(VmExit::ThreadPanicked { message, .. }) if message == "under seccomp");
                // SAFETY: as above; the test harness must not go on under the filter.
                unsafe { libc::_exit(if ok { 0 } else { 3 }) };
            });
            let _ = t.join();
            unreachable!("the filtered thread ends the process");
        }
        for kind in [ThreadKind::Devices, ThreadKind::Vcpu] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "panics::tests::the_panic_path_stays_within_the_thread_filters", "--nocapture"])
                .env(UNDER_SECCOMP, kind.name())
                .env("RUST_BACKTRACE", "1")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(0), "{}: {:?}\n{stderr}", kind.name(), out.status);
            let line = stderr.lines().find(|l| l.contains("panicked")).unwrap_or_default();
            assert!(line.starts_with("wisp-vmm: thread '"), "{stderr}");
            assert!(line.contains("src/panics.rs:") && line.ends_with(": under seccomp"), "{stderr}");
        }
    }

    #[test]
    fn a_thread_that_ends_normally_reports_nothing() {
        let (tx, rx) = channel();
        report_panics("vCPU 0", &tx, || {});
        drop(tx);
        assert!(rx.recv().is_err());
        let (tx, rx) = channel();
        report_panics("vCPU 0", &tx, || std::panic::panic_any(7u32));
        assert!(matches!(rx.recv().unwrap(), VmExit::ThreadPanicked { message, .. } if message == "(no message)"));
    }
}
