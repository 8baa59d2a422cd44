//! Per-thread seccomp filters: each kind of wisp-vmm thread installs its own allow-list
//! before it touches guest data. The lists are data (`seccomp/x86_64.json`, reviewed
//! like code, with `seccomp/collect.sh` to check them against what the threads really
//! call), compiled to BPF at build time (`build.rs`, rust-vmm `seccompiler`). A call
//! outside a thread's list kills the whole VMM (`SECCOMP_RET_KILL_PROCESS`, SIGSYS):
//! the shim then reports the pod's tasks as exited.
//!
//! - vcpu: the vCPU threads (KVM_RUN and the device registers they reach);
//! - devices: the device thread's event loop (virtio queues, taps, vsock sockets, the
//!   virtio-fs passthrough's file operations);
//! - control: every other thread (the main thread, signal handling, the control API's
//!   ttrpc threads), installed on the main thread once the VM runs and inherited by the
//!   threads it starts after that.
//!
//! glibc creates threads with clone3, whose flags live in memory a filter cannot read:
//! a first filter answers clone3 with ENOSYS (glibc then uses clone, whose flags the
//! control list checks: threads only).

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};

mod generated {
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    Devices,
    Control,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vcpu, ThreadKind::Devices, ThreadKind::Control];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Devices => "devices",
            ThreadKind::Control => "control",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    fn program(self) -> &'static [(u16, u8, u8, u32)] {
        match self {
            ThreadKind::Vcpu => generated::VCPU,
            ThreadKind::Devices => generated::DEVICES,
            ThreadKind::Control => generated::CONTROL,
        }
    }

    /// How many system calls (rules) the kind's allow-list has.
    pub fn rules(self) -> usize {
        match self {
            ThreadKind::Vcpu => generated::VCPU_RULES,
            ThreadKind::Devices => generated::DEVICES_RULES,
            ThreadKind::Control => generated::CONTROL_RULES,
        }
    }
}

fn install_program(prog: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut libc::sock_filter };
    // SAFETY: seccomp(2) reads the program, which outlives the call.
    let r = unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &fprog as *const libc::sock_fprog)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// clone3 -> ENOSYS; everything else is left to the allow-list.
fn clone3_enosys() -> [libc::sock_filter; 4] {
    let f = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        f(BPF_LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        f(BPF_JEQ_K, 0, 1, libc::SYS_clone3 as u32),
        f(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        f(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Installs `kind`'s filter on the calling thread (and no_new_privs, which seccomp
/// needs without CAP_SYS_ADMIN). Threads it starts later inherit it.
pub fn install(kind: ThreadKind) -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let prog: Vec<libc::sock_filter> =
        kind.program().iter().map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k }).collect();
    // The clone3 filter first: once the allow-list is in place, seccomp(2) itself is
    // outside it.
    install_program(&clone3_enosys()).map_err(|e| io::Error::new(e.kind(), format!("seccomp clone3 filter: {e}")))?;
    install_program(&prog)
        .map_err(|e| io::Error::new(e.kind(), format!("seccomp filter for {} threads: {e}", kind.name())))
}

/// Whether filters are installed at all (`--no-seccomp` turns them off for debugging).
static ENABLED: AtomicU8 = AtomicU8::new(1);

pub fn set_enabled(on: bool) {
    ENABLED.store(u8::from(on), Ordering::SeqCst);
}

/// Installs `kind`'s filter unless filters are off; on failure the thread must not go on.
pub fn install_if_enabled(kind: ThreadKind) -> io::Result<()> {
    if ENABLED.load(Ordering::SeqCst) == 0 {
        return Ok(());
    }
    install(kind)
}

/// Test-only (`--seccomp-selftest KIND`): once armed, the next thread of that kind to
/// pass a check point makes a call outside its list, so a test can see the filter kill
/// the VMM. 0 = none, else 1 + the kind's index.
static SELFTEST: AtomicU8 = AtomicU8::new(0);

pub fn arm_selftest(kind: ThreadKind) {
    let i = ThreadKind::ALL.iter().position(|k| *k == kind).unwrap_or(0) as u8;
    SELFTEST.store(i + 1, Ordering::SeqCst);
}

/// A check point of a `kind` thread: makes the forbidden call if the self-test is armed
/// for that kind (mount(2), which no list allows).
pub fn selftest_point(kind: ThreadKind) {
    let armed = SELFTEST.load(Ordering::Relaxed);
    if armed != 0 && ThreadKind::ALL.get(usize::from(armed - 1)) == Some(&kind) {
        log::warn!("seccomp self-test: a {} thread makes a forbidden call (mount)", kind.name());
        // SAFETY: mount(2) with null arguments; the filter kills the process first.
        unsafe { libc::syscall(libc::SYS_mount, 0usize, 0usize, 0usize, 0usize, 0usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_program_and_rules() {
        for k in ThreadKind::ALL {
            assert!(k.program().len() > k.rules(), "{}", k.name());
            assert!(k.rules() > 10, "{}", k.name());
            assert_eq!(ThreadKind::parse(k.name()), Some(k));
        }
    }

    /// The ioctl numbers in the lists are the requests their comments name.
    #[test]
    fn ioctl_numbers_match_their_names() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/seccomp/x86_64.json")).unwrap();
        let lists: serde_json::Value = serde_json::from_str(&text).unwrap();
        use kvm_bindings::*;
        use std::mem::size_of;
        // The kernel's _IOC encoding: direction (1 write, 2 read), size, type (KVMIO), nr.
        let ioc = |dir: u64, nr: u64, size: usize| dir << 30 | (size as u64) << 16 | (KVMIO as u64) << 8 | nr;
        let (io, ior, iowr) = (|nr| ioc(0, nr, 0), |nr, size| ioc(2, nr, size), |nr, size| ioc(3, nr, size));
        let known: [(&str, u64); 20] = [
            ("KVM_RUN", io(0x80)),
            ("KVM_GET_REGS", ior(0x81, size_of::<kvm_regs>())),
            ("KVM_GET_SREGS", ior(0x83, size_of::<kvm_sregs>())),
            ("KVM_GET_MSRS", iowr(0x88, size_of::<kvm_msrs>())),
            ("KVM_GET_FPU", ior(0x8c, size_of::<kvm_fpu>())),
            ("KVM_GET_LAPIC", ior(0x8e, size_of::<kvm_lapic_state>())),
            ("KVM_GET_CPUID2", iowr(0x91, size_of::<kvm_cpuid2>())),
            ("KVM_GET_MP_STATE", ior(0x98, size_of::<kvm_mp_state>())),
            ("KVM_GET_VCPU_EVENTS", ior(0x9f, size_of::<kvm_vcpu_events>())),
            ("KVM_GET_DEBUGREGS", ior(0xa1, size_of::<kvm_debugregs>())),
            ("KVM_GET_TSC_KHZ", io(0xa3)),
            ("KVM_GET_XSAVE", ior(0xa4, size_of::<kvm_xsave>())),
            ("KVM_GET_XCRS", ior(0xa6, size_of::<kvm_xcrs>())),
            ("KVM_GET_IRQCHIP", iowr(0x62, size_of::<kvm_irqchip>())),
            ("KVM_GET_PIT2", ior(0x9f, size_of::<kvm_pit_state2>())),
            ("KVM_GET_CLOCK", ior(0x7c, size_of::<kvm_clock_data>())),
            ("TUNSETOFFLOAD", libc::TUNSETOFFLOAD as u64),
            ("TUNSETVNETHDRSZ", libc::TUNSETVNETHDRSZ as u64),
            ("FIONBIO", libc::FIONBIO as u64),
            ("FIONREAD", libc::FIONREAD as u64),
        ];
        let mut checked = 0;
        for kind in ThreadKind::ALL {
            for r in lists[kind.name()]["filter"].as_array().unwrap() {
                if r["syscall"] != "ioctl" {
                    continue;
                }
                let val = r["args"][0]["val"].as_u64().unwrap();
                let comment = r["comment"].as_str().unwrap();
                let (name, want) = known.iter().find(|(n, _)| comment.starts_with(n)).expect(comment);
                assert_eq!(val, *want, "{}: {name}", kind.name());
                checked += 1;
            }
        }
        assert!(checked >= 21, "{checked}");
    }

    /// In a forked child: the filter installs, clone3 answers ENOSYS (control), an allowed call
    /// works, and mount(2) kills with SIGSYS. The child reports each step through a
    /// pipe, so a kill that came too early (in the install) cannot pass for the real one.
    #[test]
    fn a_call_outside_the_list_kills_the_process() {
        for kind in ThreadKind::ALL {
            let mut fds = [0; 2];
            // SAFETY: pipe(2) fills two descriptors.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: fork in a test; the child only makes system calls and _exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let step = |b: u8| unsafe { libc::write(fds[1], &b as *const u8 as *const libc::c_void, 1) };
                if install(kind).is_err() {
                    unsafe { libc::_exit(2) };
                }
                step(b'i');
                // Only control threads start threads: there clone3 answers ENOSYS (for
                // the others it is outside the list, which wins over the errno).
                if kind == ThreadKind::Control {
                    let r = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
                    let errno = io::Error::last_os_error().raw_os_error();
                    if r != -1 || errno != Some(libc::ENOSYS) {
                        unsafe { libc::_exit(3) };
                    }
                }
                step(b'c');
                unsafe { libc::syscall(libc::SYS_getpid) };
                step(b'g');
                unsafe { libc::syscall(libc::SYS_mount, 0usize, 0usize, 0usize, 0usize, 0usize) };
                unsafe { libc::_exit(4) };
            }
            // SAFETY: closing our copy of the write end, then reading the child's steps.
            unsafe { libc::close(fds[1]) };
            let mut steps = Vec::new();
            let mut buf = [0u8; 8];
            loop {
                let n = unsafe { libc::read(fds[0], buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
                if n <= 0 {
                    break;
                }
                steps.extend_from_slice(&buf[..n as usize]);
            }
            unsafe { libc::close(fds[0]) };
            let mut status = 0;
            unsafe { libc::waitpid(pid, &mut status, 0) };
            assert_eq!(steps, b"icg", "{}: the child got through {} steps", kind.name(), steps.len());
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "{}: status {status:#x} (exit {})",
                kind.name(),
                libc::WEXITSTATUS(status)
            );
        }
    }
}
