//! The task semantics against a fake guest (`fakepod.rs`): no KVM, no containerd.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use containerd_shim_protos::events::task::{TaskDelete, TaskExit};

use super::*;
use crate::fakepod::{FakeEngine, FakePod};

/// What was published: the topic, and for exits and deletes "id status".
#[derive(Default)]
struct Recorded(Mutex<Vec<String>>);

impl EventSink for Recorded {
    fn publish(&self, topic: &str, event: Box<dyn protobuf::MessageDyn>) {
        let what = if let Some(e) = event.downcast_ref::<TaskExit>() {
            format!("{topic} {} {}", e.id, e.exit_status)
        } else if let Some(e) = event.downcast_ref::<TaskDelete>() {
            format!("{topic} {} {}", e.id, e.exit_status)
        } else if let Some(e) = event.downcast_ref::<TaskOOM>() {
            format!("{topic} {}", e.container_id)
        } else {
            topic.to_string()
        };
        self.0.lock().unwrap().push(what);
    }
}

impl Recorded {
    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (at most 10 s, then fails) until an event `what` was published: exits
    /// are published by waiter threads.
    fn expect(&self, what: &str) {
        for _ in 0..1000 {
            if self.all().iter().any(|e| e == what) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no event {what:?}; published: {:?}", self.all());
    }
}

struct Pod {
    sb: Arc<Sandbox>,
    events: Arc<Recorded>,
    engine: Arc<FakeEngine>,
    dir: tempfile::TempDir,
}

fn pod() -> Pod {
    let events = Arc::new(Recorded::default());
    let engine = Arc::new(FakeEngine::default());
    let sb = Sandbox::new("sb", "ns", events.clone(), Arc::default(), engine.clone());
    Pod { sb, events, engine, dir: tempfile::tempdir().unwrap() }
}

/// A request for container `id` (its bundle rewritten), whose config names existing (empty) host files.
fn request(dir: &Path, id: &str, annotations: serde_json::Value) -> CreateRequest {
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let spec = serde_json::json!({
        "ociVersion": "1.0.2", "process": { "args": ["true"], "cwd": "/" },
        "root": { "path": "rootfs" }, "annotations": annotations
    });
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    for f in ["wisp-vmm", "vmlinux", "initrd.img"] {
        std::fs::write(dir.join(f), b"").unwrap();
    }
    let config = format!(
        "[hypervisor]\npath = \"{0}/wisp-vmm\"\nkernel = \"{0}/vmlinux\"\ninitrd = \"{0}/initrd.img\"\n\
         [runtime]\nstate_dir = \"{0}/state\"\n",
        dir.display()
    );
    std::fs::write(dir.join("wisp.toml"), config).unwrap();
    CreateRequest {
        id: id.into(),
        bundle,
        rootfs: Vec::new(),
        stdio: StdioPaths::default(),
        config_path: Some(dir.join("wisp.toml")),
    }
}

impl Pod {
    fn create(&self, id: &str) -> Result<(), TaskError> {
        self.sb.create(request(self.dir.path(), id, serde_json::json!({})))
    }

    fn guest(&self) -> Arc<FakePod> {
        self.engine.pod()
    }

    fn status(&self, cid: &str, eid: &str) -> Status {
        self.sb.state(cid, eid).unwrap().0
    }

    /// Wait's answer, from another thread; fails if Wait has not returned in 10 s.
    fn wait(&self, cid: &str, eid: &str) -> mpsc::Receiver<Result<Exit, TaskError>> {
        let (tx, rx) = mpsc::channel();
        let (sb, cid, eid) = (self.sb.clone(), cid.to_string(), eid.to_string());
        std::thread::spawn(move || {
            let _ = tx.send(sb.wait(&cid, &eid));
        });
        rx
    }
}

fn status_of(rx: mpsc::Receiver<Result<Exit, TaskError>>) -> u32 {
    rx.recv_timeout(Duration::from_secs(10)).expect("Wait never returned").expect("Wait failed").status
}

fn class(e: TaskError) -> &'static str {
    match e {
        TaskError::NotFound(_) => "NotFound",
        TaskError::AlreadyExists(_) => "AlreadyExists",
        TaskError::FailedPrecondition(_) => "FailedPrecondition",
        TaskError::InvalidArgument(_) => "InvalidArgument",
        TaskError::Internal(_) => "Internal",
    }
}

#[test]
fn create_start_exit_delete_in_order_and_the_last_delete_ends_the_vm() {
    let p = pod();
    p.create("c1").unwrap();
    assert_eq!(p.status("c1", ""), Status::Created);
    let waiting = p.wait("c1", "");
    assert_eq!(p.sb.start("c1", "").unwrap(), std::process::id());
    assert_eq!(p.status("c1", ""), Status::Running);
    p.guest().exit("c1", "", 7);
    assert_eq!(status_of(waiting), 7);
    p.events.expect("/tasks/exit c1 7");
    assert_eq!(p.status("c1", ""), Status::Stopped);
    let (_, exit) = p.sb.delete("c1", "").unwrap();
    assert_eq!(exit.status, 7);
    assert_eq!(
        p.events.all(),
        ["/tasks/create", "/tasks/start", "/tasks/exit c1 7", "/tasks/delete c1 7"],
        "events out of order or missing"
    );
    let g = p.guest();
    assert_eq!(*g.unmounted.lock().unwrap(), ["c1"]);
    assert_eq!(g.calls(), ["mount c1/", "create c1/", "attach c1/", "start c1/", "remove c1/", "shutdown"]);
    assert!(p.sb.done.is_set(), "the shim was not told it may exit");
    assert_eq!(p.engine.pods.lock().unwrap().len(), 1, "one pod, one VM");
}

#[test]
fn a_vm_that_dies_ends_every_live_process_with_255() {
    let p = pod();
    p.create("c1").unwrap();
    p.sb.start("c1", "").unwrap();
    p.sb.add_exec("c1", "e1", StdioPaths::default(), b"{}".to_vec()).unwrap();
    p.sb.start("c1", "e1").unwrap();
    p.sb.add_exec("c1", "e2", StdioPaths::default(), b"{}".to_vec()).unwrap();
    p.create("c2").unwrap();
    let waits = [p.wait("c1", ""), p.wait("c1", "e1"), p.wait("c1", "e2"), p.wait("c2", "")];

    p.guest().die("guest kernel panic");
    for w in waits {
        assert_eq!(status_of(w), VM_GONE_STATUS);
    }
    // TaskExit for the processes containerd saw start; the others' waiters learn it.
    p.events.expect("/tasks/exit c1 255");
    p.events.expect("/tasks/exit e1 255");
    assert!(!p.events.all().iter().any(|e| e.contains("e2") || e.contains("c2 255")), "{:?}", p.events.all());
    for (c, e) in [("c1", ""), ("c1", "e1"), ("c1", "e2"), ("c2", "")] {
        assert_eq!(p.status(c, e), Status::Stopped, "{c}/{e}");
    }
    assert_eq!(class(p.sb.kill("c1", "", 9, false).unwrap_err()), "NotFound");
    let e = p.sb.start("c2", "").unwrap_err();
    assert_eq!(e.to_string(), "cannot start container c2: it is stopped");
    let e = p.create("c3").unwrap_err();
    assert!(matches!(e, TaskError::FailedPrecondition(_)) && e.to_string().contains("VM is gone"), "{e}");
    assert!(p.sb.state("c3", "").is_err(), "a refused create left its container");

    p.sb.delete("c1", "").unwrap();
    assert!(!p.guest().calls().contains(&"shutdown".to_string()), "c2 is left: the pod must stay");
    let (_, exit) = p.sb.delete("c2", "").unwrap();
    assert_eq!(exit.status, VM_GONE_STATUS);
    assert_eq!(p.guest().calls().last().unwrap(), "shutdown");
    assert!(p.sb.done.is_set());
}

#[test]
fn a_failed_start_wakes_wait_with_126() {
    let p = pod();
    p.create("c1").unwrap();
    let waiting = p.wait("c1", "");
    p.guest().fail("start");
    assert_eq!(class(p.sb.start("c1", "").unwrap_err()), "Internal");
    assert_eq!(status_of(waiting), START_FAILED_STATUS);
    assert_eq!(p.status("c1", ""), Status::Stopped);
    assert_eq!(p.sb.delete("c1", "").unwrap().1.status, START_FAILED_STATUS);
}

#[test]
fn an_exec_whose_stdio_fails_is_killed_and_ends_with_126() {
    let p = pod();
    p.create("c1").unwrap();
    p.sb.start("c1", "").unwrap();
    p.sb.add_exec("c1", "e1", StdioPaths::default(), b"{}".to_vec()).unwrap();
    let waiting = p.wait("c1", "e1");
    p.guest().fail("attach");
    assert!(p.sb.start("c1", "e1").is_err());
    assert_eq!(status_of(waiting), START_FAILED_STATUS);
    assert!(p.guest().calls().contains(&"signal c1/e1".to_string()), "{:?}", p.guest().calls());
    assert_eq!(p.sb.delete("c1", "e1").unwrap().1.status, START_FAILED_STATUS);
    assert_eq!(p.status("c1", ""), Status::Running, "the container is not touched");
}

#[test]
fn a_failed_create_unmounts_and_leaves_a_vm_others_use() {
    let p = pod();
    // A boot that fails leaves nothing behind.
    p.engine.fail_boot.store(true, Ordering::SeqCst);
    assert_eq!(class(p.create("c1").unwrap_err()), "Internal");
    assert!(p.sb.is_empty() && p.events.all().is_empty());
    assert!(p.engine.pods.lock().unwrap().is_empty());

    // The guest refuses a second container: its mounts go, the VM stays for c1.
    p.create("c1").unwrap();
    let g = p.guest();
    g.fail("create");
    assert_eq!(class(p.create("c2").unwrap_err()), "Internal");
    assert_eq!(*g.unmounted.lock().unwrap(), ["c2"]);
    assert!(!g.calls().contains(&"shutdown".to_string()), "c1 still uses the VM");
    assert!(p.sb.state("c2", "").is_err(), "the failed container is still listed");
    assert_eq!(p.status("c1", ""), Status::Created);
    assert_eq!(p.events.all(), ["/tasks/create"], "a failed create published events");
}

#[test]
fn a_container_being_created_holds_its_id() {
    let p = pod();
    let tx = p.engine.hold_boot();
    let sb = p.sb.clone();
    let req = request(p.dir.path(), "c1", serde_json::json!({}));
    let creating = std::thread::spawn(move || sb.create(req));
    let mut seen = false;
    for _ in 0..1000 {
        if p.sb.state("c1", "").is_ok() {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(seen, "the container's id was not taken during its create");
    assert_eq!(p.status("c1", ""), Status::Creating);
    assert_eq!(class(p.create("c1").unwrap_err()), "AlreadyExists");
    assert_eq!(class(p.sb.kill("c1", "", 9, false).unwrap_err()), "FailedPrecondition");
    assert_eq!(class(p.sb.delete("c1", "").unwrap_err()), "FailedPrecondition");
    assert_eq!(class(p.sb.start("c1", "").unwrap_err()), "FailedPrecondition");
    assert_eq!(class(p.sb.pids("c1").unwrap_err()), "FailedPrecondition");
    tx.send(()).unwrap();
    creating.join().unwrap().unwrap();
    assert_eq!(p.status("c1", ""), Status::Created);
}

#[test]
fn a_failed_first_create_undoes_every_step_and_the_vm() {
    let p = pod();
    p.engine.fail_in_next_pod("attach");
    assert_eq!(class(p.create("c1").unwrap_err()), "Internal");
    let g = p.guest();
    assert_eq!(
        g.calls(),
        ["mount c1/", "create c1/", "attach c1/", "remove c1/", "shutdown"],
        "the failed create did not undo its steps in order"
    );
    assert_eq!(*g.unmounted.lock().unwrap(), ["c1"]);
    assert!(p.sb.is_empty() && p.events.all().is_empty());
    assert!(!p.sb.done.is_set(), "a failed create does not end the shim");
    // The id is free again, in a new VM.
    p.create("c1").unwrap();
    assert_eq!(p.engine.pods.lock().unwrap().len(), 2);
}

#[test]
fn calls_in_the_wrong_state_are_refused_by_class() {
    let p = pod();
    p.create("c1").unwrap();
    assert_eq!(class(p.create("c1").unwrap_err()), "AlreadyExists");
    assert_eq!(class(p.sb.pause("c1", true).unwrap_err()), "FailedPrecondition");
    assert_eq!(class(p.sb.add_exec("c1", "e1", StdioPaths::default(), b"{}".to_vec()).unwrap_err()), "FailedPrecondition");
    p.sb.start("c1", "").unwrap();
    assert_eq!(class(p.sb.start("c1", "").unwrap_err()), "FailedPrecondition");
    assert_eq!(class(p.sb.pause("c1", false).unwrap_err()), "FailedPrecondition");
    let e = p.sb.delete("c1", "").unwrap_err();
    assert_eq!(e.to_string(), "cannot delete container c1: it is running");
    p.sb.add_exec("c1", "e1", StdioPaths::default(), b"{}".to_vec()).unwrap();
    assert_eq!(
        class(p.sb.add_exec("c1", "e1", StdioPaths::default(), b"{}".to_vec()).unwrap_err()),
        "AlreadyExists"
    );
    p.sb.start("c1", "e1").unwrap();
    assert_eq!(class(p.sb.delete("c1", "e1").unwrap_err()), "FailedPrecondition");
    p.sb.kill("c1", "e1", 15, false).unwrap();
    p.events.expect("/tasks/exit e1 143");
    assert_eq!(class(p.sb.kill("c1", "e1", 15, false).unwrap_err()), "NotFound");
    assert_eq!(p.sb.delete("c1", "e1").unwrap().1.status, 143);
    assert_eq!(class(p.sb.state("c1", "e1").unwrap_err()), "NotFound");
}

#[test]
fn kill_before_start_ends_the_container_without_the_guest() {
    let p = pod();
    p.create("c1").unwrap();
    let waiting = p.wait("c1", "");
    p.sb.kill("c1", "", 9, false).unwrap();
    assert_eq!(status_of(waiting), 137);
    assert_eq!(p.events.all().last().unwrap(), "/tasks/exit c1 137");
    assert!(!p.guest().calls().iter().any(|c| c.starts_with("signal")));
    assert_eq!(class(p.sb.start("c1", "").unwrap_err()), "FailedPrecondition");
}

#[test]
fn pause_and_resume_change_the_state_and_publish() {
    let p = pod();
    p.create("c1").unwrap();
    p.sb.start("c1", "").unwrap();
    p.sb.pause("c1", true).unwrap();
    assert_eq!(p.status("c1", ""), Status::Paused);
    assert_eq!(class(p.sb.add_exec("c1", "e1", StdioPaths::default(), b"{}".to_vec()).unwrap_err()), "FailedPrecondition");
    p.sb.pause("c1", false).unwrap();
    assert_eq!(p.status("c1", ""), Status::Running);
    let ev = p.events.all();
    assert_eq!(ev[ev.len() - 2..], ["/tasks/paused", "/tasks/resumed"]);
    // A guest that fails the call leaves the state as it was.
    p.guest().fail("pause");
    assert!(p.sb.pause("c1", true).is_err());
    assert_eq!(p.status("c1", ""), Status::Running);
}

#[test]
fn oom_events_pass_only_for_the_pods_own_containers() {
    let p = pod();
    p.create("c1").unwrap();
    p.guest().oom("someone-else");
    p.guest().oom("c1");
    p.events.expect("/tasks/oom c1");
    assert!(!p.events.all().iter().any(|e| e.contains("someone-else")));
}

#[test]
fn shutdown_with_containers_left_wakes_their_waiters() {
    let p = pod();
    p.create("c1").unwrap();
    p.sb.start("c1", "").unwrap();
    // What a Wait call in progress holds (a Wait started now could find c1 gone).
    let waiting = process_mut(&mut p.sb.lock(), "c1", "").unwrap().exit.clone();
    p.sb.shutdown_now();
    let exit = waiting.wait_timeout(Duration::from_secs(10)).expect("the waiter was not woken");
    assert_eq!(exit.status, VM_GONE_STATUS);
    assert!(p.sb.is_empty() && p.sb.done.is_set());
    assert_eq!(p.guest().calls().last().unwrap(), "shutdown");
    assert_eq!(*p.guest().unmounted.lock().unwrap(), ["c1"]);
}

/// containerd 2.4 (CRI): the sandbox's exit handler deletes its task, the last one, so
/// that Delete shuts the VM down; meanwhile RemovePodSandbox's Delete finds nothing and
/// sends Shutdown. That Shutdown must not let the shim exit under the teardown: the shim's
/// server would stop reading while the teardown's call keeps the connection open, and
/// containerd's next call would hang (it gives Shutdown 3 s, then fails the removal).
#[test]
fn shutdown_during_the_last_deletes_teardown_leaves_the_exit_to_it() {
    let p = pod();
    p.create("c1").unwrap();
    p.sb.start("c1", "").unwrap();
    p.guest().exit("c1", "", 137);
    p.events.expect("/tasks/exit c1 137");
    let release = p.guest().hold_shutdown();
    let sb = p.sb.clone();
    let (tx, deleted) = mpsc::channel();
    std::thread::spawn(move || tx.send(sb.delete("c1", "").map(|(_, e)| e.status)).unwrap());
    // The Delete is in the guest's shutdown once the fake has recorded the call.
    for _ in 0..1000 {
        if p.guest().calls().last().map(String::as_str) == Some("shutdown") {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(p.guest().calls().last().map(String::as_str), Some("shutdown"), "the Delete never shut the VM down");
    assert!(matches!(p.sb.delete("c1", ""), Err(TaskError::NotFound(_))));
    assert!(p.sb.is_empty());
    p.sb.shutdown_now();
    assert!(!p.sb.done.is_set(), "Shutdown let the shim exit while the VM was still being shut down");
    release.send(()).unwrap();
    assert_eq!(deleted.recv_timeout(Duration::from_secs(10)).expect("the Delete did not return").unwrap(), 137);
    assert!(p.sb.done.is_set(), "the Delete that shut the VM down did not let the shim exit");
    assert_eq!(p.guest().calls().iter().filter(|c| *c == "shutdown").count(), 1, "the VM was shut down twice");
}

#[test]
fn delete_closes_the_init_processs_stdin() {
    let p = pod();
    p.create("c1").unwrap();
    p.sb.kill("c1", "", 9, false).unwrap();
    p.sb.delete("c1", "").unwrap();
    assert_eq!(*p.guest().stdin_closed.lock().unwrap(), [("c1".to_string(), String::new())]);
}

#[test]
fn bad_create_requests_are_refused_before_any_vm_exists() {
    let p = pod();
    let dir = p.dir.path();
    let e = p.sb.create(request(dir, "a/b", serde_json::json!({}))).unwrap_err();
    assert!(matches!(e, TaskError::InvalidArgument(_)), "{e}");
    let e = p.sb.create(request(dir, &"x".repeat(300), serde_json::json!({}))).unwrap_err();
    assert!(matches!(e, TaskError::InvalidArgument(_)), "{e}");

    let refused = serde_json::json!({ "io.wisp.config.hypervisor.vcpus": "2" });
    let e = p.sb.create(request(dir, "c1", refused)).unwrap_err();
    assert!(matches!(e, TaskError::InvalidArgument(_)) && e.to_string().contains("hypervisor.vcpus"), "{e}");

    let mut bad_bundle = request(dir, "c1", serde_json::json!({}));
    bad_bundle.bundle = dir.join("missing");
    let e = p.sb.create(bad_bundle).unwrap_err();
    assert!(e.to_string().contains("config.json"), "{e}");

    let r = request(dir, "c1", serde_json::json!({}));
    std::fs::write(dir.join("wisp.toml"), "[hypervisor]\nvcpu = 2\n").unwrap();
    let e = p.sb.create(r).unwrap_err();
    assert!(e.to_string().contains("hypervisor.vcpu"), "{e}");

    let r = request(dir, "c1", serde_json::json!({}));
    std::fs::remove_file(dir.join("vmlinux")).unwrap();
    let e = p.sb.create(r).unwrap_err();
    assert!(matches!(e, TaskError::FailedPrecondition(_)) && e.to_string().contains("hypervisor.kernel"), "{e}");

    assert!(p.engine.pods.lock().unwrap().is_empty(), "a refused create booted a VM");
    assert!(p.sb.is_empty() && p.events.all().is_empty(), "a refused create left state or sent events");
}

#[test]
fn calls_on_unknown_tasks_are_not_found() {
    let p = pod();
    let sb = &p.sb;
    let nf = |r: Result<(), TaskError>| assert!(matches!(r, Err(TaskError::NotFound(_))), "{r:?}");
    nf(sb.start("nope", "").map(|_| ()));
    nf(sb.pause("nope", true));
    nf(sb.kill("nope", "", 9, false));
    nf(sb.delete("nope", "").map(|_| ()));
    nf(sb.wait("nope", "").map(|_| ()));
    nf(sb.state("nope", "").map(|_| ()));
    nf(sb.pids("nope").map(|_| ()));
    nf(sb.stats("nope").map(|_| ()));
    nf(sb.update("nope", b"{}".to_vec()));
    nf(sb.resize_pty("nope", "", 80, 24));
    nf(sb.close_stdin("nope", ""));
    nf(sb.add_exec("nope", "e1", StdioPaths::default(), b"{}".to_vec()));
    let e = sb.add_exec("nope", "", StdioPaths::default(), b"{}".to_vec()).unwrap_err();
    assert!(matches!(e, TaskError::InvalidArgument(_)), "{e}");
}
