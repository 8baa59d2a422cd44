//! wisp-conformance: critest (cri-tools' CRI validation suite, built by
//! tests/tools/go-tools.sh) against one containerd's CRI plugin, first with runtime handler
//! `runc` (the peer), then with `wisp`, and a table of both (`make conformance`; it runs
//! inside the emulated KVM host through tests/conformance.sh).
//!
//!   wisp-conformance --out DIR [--focus REGEX] [--parallel N]
//!
//! No network: the images critest's container specs use are built here and imported under
//! their exact names (a spec pulls an image only when it is missing); the image-service
//! groups always pull from a registry and are left out for both runtimes (image handling
//! is containerd's, the same for every runtime). The pods get a CNI bridge network with
//! the portmap plugin (host ports).
//!
//! For wisp, specs a VM runtime cannot or should not pass are skipped with the reason
//! (`VM_SKIPS`); every other spec runs for both.
//!
//! Output: DIR/runc.json and DIR/wisp.json (ginkgo's JSON reports), DIR/{runc,wisp}.log
//! (critest's output), DIR/containerd.log (containerd's, shims' included), DIR/table.md
//! (spec, runc, wisp, and for every wisp skip or failure the reason), DIR/summary.txt.
//! Exits non-zero when a spec runc passes is not passed by wisp (a `VM_SKIPS` skip
//! aside): a spec both fail is the environment's or containerd's, not wisp's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;
use wisp_tests::containerd::{wisp_config, Containerd, CRI_NAMESPACE};
use wisp_tests::harness::emulator_fault;
use wisp_tests::{cni, go_tool, image};

/// The images critest's container specs use (cri-tools v1.37 `pkg/framework`,
/// `pkg/validate`), built here from the busybox rootfs with what the specs rely on:
/// the users and groups of the busybox image (`nobody`, `www-data`), `pgrep` and `ipcs`
/// (Debian's busybox has neither applet: procps' and util-linux' binaries with their
/// libraries), for the nginx images a web server whose PID 1 is named like nginx's
/// master process and keeps its pid where nginx does, and the rest in `IMAGES`.
const BUSYBOX: &str = "registry.k8s.io/e2e-test-images/busybox:1.29-2";
const NGINX: &str = "registry.k8s.io/e2e-test-images/nginx:1.14-2";
const HOSTNET_NGINX: &str = "gcr.io/k8s-staging-cri-tools/hostnet-nginx-amd64:latest";

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
bin:x:2:2:bin:/bin:/bin/false\nsys:x:3:3:sys:/dev:/bin/false\nsync:x:4:100:sync:/bin:/bin/sync\n\
mail:x:8:8:mail:/var/spool/mail:/bin/false\nwww-data:x:33:33:www-data:/var/www:/bin/false\n\
operator:x:37:37:Operator:/var:/bin/false\nnobody:x:65534:65534:nobody:/home:/bin/false\n";
const GROUP: &str = "root:x:0:\ndaemon:x:1:\nbin:x:2:\nsys:x:3:\nadm:x:4:\ntty:x:5:\ndisk:x:6:\n\
wheel:x:10:root\nmail:x:12:\nwww-data:x:33:\noperator:x:37:\nusers:x:100:\nnogroup:x:65534:\n";

/// nginx's stand-in: re-executes itself as "nginx: master process ..." (what specs look
/// for in /proc/1/cmdline), writes its pid to /var/run/nginx.pid, and runs busybox httpd
/// on PORT serving /www as its child.
const NGINX_C: &str = r#"#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>
int main(int argc, char **argv) {
    (void)argc;
    if (strncmp(argv[0], "nginx: master", 13) != 0) {
        char *args[] = {"nginx: master process nginx -g daemon off;", NULL};
        execv("/proc/self/exe", args);
        return 127;
    }
    FILE *f = fopen("/var/run/nginx.pid", "w");
    if (f) { fprintf(f, "%d\n", (int)getpid()); fclose(f); }
    if (fork() == 0) {
        execl("/bin/busybox", "httpd", "-f", "-p", PORT, "-h", "/www", (char *)NULL);
        _exit(127);
    }
    for (;;) { int st; if (waitpid(-1, &st, 0) < 0) pause(); }
}
"#;

/// Copies `bin` and the shared libraries `ldd` lists for it into `root` at their paths.
fn add_dynamic(root: &Path, bin: &str) -> anyhow::Result<()> {
    let out = Command::new("ldd").arg(bin).output().with_context(|| format!("ldd {bin}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut files = vec![bin.to_string()];
    for line in text.lines() {
        // "libx.so => /lib/.../libx.so (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line.split("=>").last().unwrap_or("").split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            files.push(path.to_string());
        }
    }
    for f in files {
        let to = root.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().context("a path with a parent")?)?;
        std::fs::copy(&f, &to).with_context(|| format!("copying {f} into the image"))?;
    }
    Ok(())
}

/// What sets one stand-in image apart from the plain busybox one.
enum Kind {
    /// critest's default container image.
    Busybox,
    /// nginx's stand-in web server on this port.
    Nginx(&'static str),
    /// Apache httpd's stand-in: busybox httpd on port 80, saying "httpd" in its log.
    Httpd,
    /// A setuid-root program printing "Effective uid: N" (the NoNewPrivs specs).
    NoNewPrivs,
    /// User default-user (1000) in group group-defined-in-image (50000) in /etc/group
    /// (the SupplementalGroupsPolicy specs).
    PredefinedGroup,
}

const IMAGES: &[(&str, Kind)] = &[
    (BUSYBOX, Kind::Busybox),
    (NGINX, Kind::Nginx("80")),
    (HOSTNET_NGINX, Kind::Nginx("12003")),
    ("registry.k8s.io/e2e-test-images/httpd:2.4.39-4", Kind::Httpd),
    ("registry.k8s.io/e2e-test-images/nonewprivs:1.3", Kind::NoNewPrivs),
    ("gcr.io/k8s-staging-cri-tools/test-image-predefined-group:latest", Kind::PredefinedGroup),
];

const NNP_C: &str = r#"#include <stdio.h>
#include <unistd.h>
int main(void) { printf("Effective uid: %d\n", (int)geteuid()); return 0; }
"#;

fn build_images(c: &Containerd, scratch: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (name, kind) in IMAGES {
        let root = wisp_tests::rootfs::busybox_rootfs()?;
        let r = root.path();
        std::fs::write(r.join("etc/passwd"), PASSWD)?;
        std::fs::write(r.join("etc/group"), GROUP)?;
        for bin in ["/usr/bin/pgrep", "/usr/bin/ipcs"] {
            add_dynamic(r, bin)?;
        }
        let web_root = |index: &str| -> anyhow::Result<()> {
            std::fs::create_dir_all(r.join("www"))?;
            std::fs::create_dir_all(r.join("var/run"))?;
            std::fs::write(r.join("www/index.html"), index)?;
            Ok(())
        };
        let cmd: Vec<&str> = match kind {
            Kind::Busybox => vec!["sh"],
            Kind::Nginx(port) => {
                web_root("<h1>Welcome to nginx!</h1>\n")?;
                let bin = image::compile_static(scratch, "nginx", NGINX_C, &[&format!("PORT=\"{port}\"")])?;
                std::fs::copy(&bin, r.join("usr/sbin/nginx"))?;
                vec!["/usr/sbin/nginx"]
            }
            Kind::Httpd => {
                web_root("<html><body><h1>It works!</h1></body></html>\n")?;
                vec!["sh", "-c", "echo 'httpd: serving /www on port 80'; exec httpd -f -p 80 -h /www"]
            }
            Kind::NoNewPrivs => {
                let bin = image::compile_static(scratch, "nnp", NNP_C, &[])?;
                std::fs::copy(&bin, r.join("usr/bin/nnp"))?;
                std::fs::set_permissions(r.join("usr/bin/nnp"), std::fs::Permissions::from_mode(0o4755))?;
                vec!["/usr/bin/nnp"]
            }
            Kind::PredefinedGroup => {
                std::fs::write(
                    r.join("etc/passwd"),
                    format!("{PASSWD}default-user:x:1000:1000:default-user:/home/user:/bin/sh\n"),
                )?;
                std::fs::write(
                    r.join("etc/group"),
                    format!("{GROUP}default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"),
                )?;
                vec!["sh"]
            }
        };
        let archive = scratch.join("image.tar");
        image::pack_image(&archive, name, &cmd, r)?;
        c.import(CRI_NAMESPACE, &archive, name)?;
    }
    Ok(())
}

/// Groups left out for both runtimes: they pull images from public registries, and image
/// handling is containerd's, identical for every runtime.
const IMAGE_GROUPS: &str = r"Image Manager|Image Consistency|Image Identifier Consistency|Image Volume";

/// Specs wisp skips, with why a VM runtime cannot or should not pass them (regex on the
/// spec's full text, reason).
const VM_SKIPS: &[(&str, &str)] = &[
    (
        r"runtime should support HostNetwork is true|runtime should support portforward in host network",
        "host network: the pod's processes run on the VM's kernel, they cannot join the host's network namespace",
    ),
    (
        r"runtime should support HostPID$",
        "host PID namespace: the pod's processes run on the VM's kernel, they cannot share the host's PID namespace",
    ),
    (
        r"runtime should support HostIpc is true",
        "host IPC namespace: the pod's processes run on the VM's kernel, they cannot share the host's IPC objects",
    ),
    (
        r"runtime should support portforward \[Conformance\]",
        "port-forward: containerd 2.4 forwards a port by dialing localhost in the pod's network namespace on the \
         host, and a VM pod's loopback is in the guest; containerd has no way yet to hand the stream to the runtime \
         (proposed in containerd pull requests 14021 and 14074; Kata Containers has the same gap, its issue 1693)",
    ),
    (
        r"mount with 'rshared' should support propagation from host to container",
        "mount propagation from container to host: the container's mounts are in the VM's kernel, and the share \
         (virtio-fs) carries files, not mounts, out of the VM (host to container works: the rslave spec passes)",
    ),
];

struct Args {
    out: PathBuf,
    focus: Option<String>,
    parallel: u32,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args { out: wisp_tests::artifact("conformance"), focus: None, parallel: 1 };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--out" => a.out = value("--out")?.into(),
            "--focus" => a.focus = Some(value("--focus")?),
            "--parallel" => {
                let v = value("--parallel")?;
                a.parallel =
                    v.parse().ok().filter(|n| *n >= 1).with_context(|| format!("--parallel {v:?}: not a count"))?;
            }
            other => {
                bail!("unknown argument {other:?} (usage: wisp-conformance --out DIR [--focus REGEX] [--parallel N])")
            }
        }
    }
    Ok(a)
}

fn conflist() -> anyhow::Result<String> {
    let mut v: Value = serde_json::from_str(&cni::conflist())?;
    v["plugins"]
        .as_array_mut()
        .context("conflist plugins")?
        .push(serde_json::json!({"type": "portmap", "capabilities": {"portMappings": true}}));
    Ok(v.to_string())
}

/// One spec's result in a ginkgo JSON report: (state, failure message).
fn results(report: &Path) -> anyhow::Result<BTreeMap<String, (String, String)>> {
    let text = std::fs::read_to_string(report).with_context(|| format!("reading {}", report.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", report.display()))?;
    let mut out = BTreeMap::new();
    for suite in v.as_array().into_iter().flatten() {
        for spec in suite["SpecReports"].as_array().into_iter().flatten() {
            if spec["LeafNodeType"] != "It" {
                continue;
            }
            let mut name: Vec<String> = spec["ContainerHierarchyTexts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect();
            name.push(spec["LeafNodeText"].as_str().unwrap_or_default().to_string());
            let state = spec["State"].as_str().unwrap_or("unknown").to_string();
            let msg = spec["Failure"]["Message"].as_str().unwrap_or_default();
            // All of it, on one line: the first line is often only critest's own words
            // ("failed to create PodSandbox") and the runtime's reason follows.
            let mut msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
            // Where it failed (a BeforeEach's pod start, an AfterEach's teardown, the It).
            if let Some(node) = spec["Failure"]["FailureNodeType"].as_str().filter(|n| !n.is_empty()) {
                msg = format!("in {node}: {msg}");
            }
            out.insert(name.join(" "), (state, msg));
        }
    }
    Ok(out)
}

/// containerd's log lines at level error or warning, each cut to 600 characters.
fn errors_in(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("level=error") || l.contains("level=warning"))
        .map(|l| l.chars().take(600).collect())
        .collect()
}

/// The reason of a wisp skip, if the spec is one of `VM_SKIPS`.
fn vm_skip_reason(spec: &str) -> Option<&'static str> {
    VM_SKIPS.iter().find(|(re, _)| matches(re, spec)).map(|(_, why)| *why)
}

/// Whether ginkgo's regex `pattern` (Go RE2 syntax; these use none of its differences
/// from the regex crate) matches `text`.
fn matches(pattern: &str, text: &str) -> bool {
    regex::Regex::new(pattern).map(|r| r.is_match(text)).unwrap_or(false)
}

/// Runs critest with `handler`; its report and output go to `<name>.json`/`<name>.log`.
fn run_critest(
    c: &Containerd,
    args: &Args,
    handler: &str,
    skip: &str,
    focus: Option<&str>,
    name: &str,
) -> anyhow::Result<PathBuf> {
    let critest = go_tool("cri-tools", "critest").map_err(anyhow::Error::msg)?;
    let endpoint = format!("unix://{}", c.socket.display());
    let report = args.out.join(format!("{name}.json"));
    let mut cmd = Command::new(&critest);
    cmd.arg(format!("-runtime-endpoint={endpoint}"))
        .arg(format!("-image-endpoint={endpoint}"))
        .arg(format!("-runtime-handler={handler}"))
        .arg(format!("-ginkgo.skip={skip}"))
        .arg(format!("-ginkgo.json-report={}", report.display()))
        .arg("-ginkgo.timeout=4h")
        .arg("-ginkgo.no-color");
    // Ginkgo refuses go test's own -parallel flag; critest's -parallel N (N > 1) runs
    // ginkgo nodes.
    if args.parallel > 1 {
        cmd.arg(format!("-parallel={}", args.parallel));
    }
    if let Some(f) = focus.or(args.focus.as_deref()) {
        cmd.arg(format!("-ginkgo.focus={f}"));
    }
    let t = Instant::now();
    eprintln!("conformance: critest with handler {handler} (skip: {skip})");
    let log = std::fs::File::create(args.out.join(format!("{name}.log")))?;
    let status = cmd.stdout(log.try_clone()?).stderr(log).status().context("running critest")?;
    eprintln!(
        "conformance: critest {handler} ended ({status}) after {:.0} s; its output: {}",
        t.elapsed().as_secs_f64(),
        args.out.join(format!("{name}.log")).display()
    );
    if !report.exists() {
        bail!("critest {handler} wrote no report ({status}); see {name}.log");
    }
    Ok(report)
}

/// Specs runc passed and wisp failed.
fn failed_where_runc_passed(
    runc: &BTreeMap<String, (String, String)>,
    wisp: &BTreeMap<String, (String, String)>,
) -> Vec<String> {
    wisp.iter()
        .filter(|(spec, (ws, _))| short(ws) == "FAIL" && runc.get(*spec).is_some_and(|(rs, _)| short(rs) == "pass"))
        .map(|(spec, _)| spec.clone())
        .collect()
}

/// The suite description ginkgo puts before every spec's text when it applies a focus
/// or skip (ginkgo v2 matches `"<suite description> <spec text>"`; critest's suite is
/// "CRI validation").
const SUITE_DESCRIPTION: &str = "CRI validation";

/// A ginkgo focus matching exactly these specs' full texts.
fn focus_on(specs: &[String]) -> String {
    let suite = regex::escape(SUITE_DESCRIPTION);
    specs.iter().map(|s| format!("^{suite} {}$", regex::escape(s))).collect::<Vec<_>>().join("|")
}

fn short(state: &str) -> &str {
    match state {
        "passed" => "pass",
        "failed" | "panicked" | "timedout" | "interrupted" | "aborted" => "FAIL",
        "skipped" | "pending" => "skip",
        other => other,
    }
}

fn main() -> std::process::ExitCode {
    // The error's chain, without the backtrace anyhow's own `Termination` adds when
    // RUST_BACKTRACE is set: it only ever pointed here.
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.out)?;
    cni::reset();
    // The guest console is kept (runtime.debug): a nested guest that stalls while its
    // kernel boots shows only there, and without it such a failure is not known for the
    // emulator fault it is (the e2e suites run the same way).
    let wisp = wisp_config("[runtime]\ndebug = true\n");
    let c = Containerd::start_with_cni(&wisp, &[("10-wisp-cri-net.conflist", &conflist()?)])?;
    eprintln!("conformance: containerd {}", c.build.version);
    c.import_cri_images()?;
    let scratch = tempfile::tempdir()?;
    build_images(&c, scratch.path())?;
    // The CRI plugin learns of the images and the network asynchronously.
    std::thread::sleep(Duration::from_secs(5));

    let vm_skip: Vec<&str> = VM_SKIPS.iter().map(|(re, _)| *re).collect();
    let wisp_skip = format!("{IMAGE_GROUPS}|{}", vm_skip.join("|"));
    let runc = run_critest(&c, &args, "runc", IMAGE_GROUPS, None, "runc");
    let wisp = runc.is_ok().then(|| run_critest(&c, &args, "wisp", &wisp_skip, None, "wisp"));
    let runc = results(&runc?)?;
    let mut wisp = results(&wisp.context("critest for runc failed")??)?;
    // Inside the emulated KVM host a nested guest now and then triple-faults or stalls (an
    // emulator fault, `tests/kvmhost/README.md`): when containerd's log shows one (the
    // signs the e2e harness reruns a case for), the specs wisp failed and runc passed run
    // once more, and a pass then counts as a pass on a rerun.
    let mut reruns: BTreeMap<String, String> = BTreeMap::new();
    let failed = failed_where_runc_passed(&runc, &wisp);
    if !failed.is_empty() && emulator_fault(&c.log()) {
        eprintln!(
            "conformance: a nested guest triple-faulted or stalled; {} failed spec(s) run once more",
            failed.len()
        );
        let again = results(&run_critest(&c, &args, "wisp", &wisp_skip, Some(&focus_on(&failed)), "wisp-rerun")?)?;
        // A focus that selects nothing would leave every failure standing unseen.
        let ran = again.iter().filter(|(spec, (state, _))| failed.contains(spec) && short(state) != "skip").count();
        if ran != failed.len() {
            bail!("the rerun's focus selected {ran} of the {} failed specs (see wisp-rerun.log)", failed.len());
        }
        for (spec, (state, _)) in again {
            if short(&state) == "pass" && failed.contains(&spec) {
                if let Some((_, first)) = wisp.insert(spec.clone(), (state, String::new())) {
                    reruns.insert(spec, first);
                }
            }
        }
    }
    // containerd's log (shim logs included), for what the reports cannot tell.
    let log = c.log();
    std::fs::write(args.out.join("containerd.log"), &log)?;
    drop(c);
    cni::delete_bridge();

    let mut table = String::from("| spec | runc | wisp | reason (wisp skip or failure) |\n| --- | --- | --- | --- |\n");
    let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut specs: Vec<&String> = runc.keys().chain(wisp.keys()).collect();
    specs.sort();
    specs.dedup();
    // Specs runc passes that wisp does not, a skip wisp documents aside: what fails the run.
    let mut short_of_runc = Vec::new();
    for spec in specs {
        let (rs, _) = runc.get(spec).map(|(s, m)| (short(s), m.as_str())).unwrap_or(("-", ""));
        let (ws, wm) = wisp.get(spec).map(|(s, m)| (short(s), m.as_str())).unwrap_or(("-", ""));
        let rerun = reruns.get(spec);
        if rs == "pass" && ws != "pass" && !(ws == "skip" && vm_skip_reason(spec).is_some()) {
            // The failure's own words, first: the table the CI log shows may be cut.
            let why: String = wm.chars().take(1500).collect();
            short_of_runc.push(format!("{spec} (wisp: {ws}): {why}"));
        }
        *counts.entry(("runc", rs)).or_default() += 1;
        *counts.entry(("wisp", if rerun.is_some() { "rerun" } else { ws })).or_default() += 1;
        let image_group = matches(IMAGE_GROUPS, spec);
        let reason = match ws {
            "skip" if image_group => {
                "image service: containerd's, the same for every runtime (needs a registry)".to_string()
            }
            "skip" => vm_skip_reason(spec).map(str::to_string).unwrap_or_else(|| format!("skipped by critest: {wm}")),
            "FAIL" => wm.replace('|', "\\|"),
            _ => match rerun {
                Some(first) => format!(
                    "passed on a rerun; the first run failed after a nested guest triple-faulted or stalled: {}",
                    first.replace('|', "\\|")
                ),
                None => String::new(),
            },
        };
        table += &format!("| {} | {rs} | {ws} | {reason} |\n", spec.replace('|', "\\|"));
    }
    let summary: Vec<String> = ["runc", "wisp"]
        .iter()
        .map(|r| {
            let n = |s| counts.get(&(*r, s)).copied().unwrap_or(0);
            format!(
                "{r}: {} passed, {} passed on a rerun, {} failed, {} skipped",
                n("pass"),
                n("rerun"),
                n("FAIL"),
                n("skip")
            )
        })
        .collect();
    std::fs::write(args.out.join("table.md"), &table)?;
    std::fs::write(args.out.join("summary.txt"), summary.join("\n") + "\n")?;
    println!("{table}");
    for s in &summary {
        println!("conformance: {s}");
    }
    if !short_of_runc.is_empty() {
        // What containerd and the shim said went wrong, for the reason critest cannot see.
        eprintln!(
            "conformance: containerd's errors and warnings (all in {}):",
            args.out.join("containerd.log").display()
        );
        for line in errors_in(&log).iter().rev().take(60).rev() {
            eprintln!("  {line}");
        }
        bail!(
            "wisp falls short of runc on {} spec(s) runc passes:\n  {}",
            short_of_runc.len(),
            short_of_runc.join("\n  ")
        );
    }
    println!("conformance: wisp passes every spec runc passes, but for the skips a VM runtime documents");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rerun_focuses_on_exactly_the_specs_wisp_failed_and_runc_passed() {
        let r = |v: &[(&str, &str)]| -> BTreeMap<String, (String, String)> {
            v.iter().map(|(k, s)| (k.to_string(), (s.to_string(), String::new()))).collect()
        };
        let runc = r(&[("a [x] (y) b", "passed"), ("c", "passed"), ("d", "failed"), ("e", "passed")]);
        let wisp = r(&[("a [x] (y) b", "failed"), ("c", "passed"), ("d", "failed"), ("e", "skipped")]);
        let failed = failed_where_runc_passed(&runc, &wisp);
        assert_eq!(failed, ["a [x] (y) b"]);
        let focus = focus_on(&failed);
        // What ginkgo matches a focus against: the suite description, a space, the text.
        assert!(matches(&focus, "CRI validation a [x] (y) b"));
        assert!(!matches(&focus, "a [x] (y) b"), "the bare text is not what ginkgo matches");
        assert!(!matches(&focus, "CRI validation a [x] (y) b and more"));
        assert!(!matches(&focus, "CRI validation c"));
    }

    #[test]
    fn skip_patterns_match_the_specs_they_name() {
        assert!(vm_skip_reason("[k8s.io] Security Context NamespaceOption runtime should support HostPID").is_some());
        assert!(vm_skip_reason("[k8s.io] Security Context NamespaceOption runtime should support HostIpc is false")
            .is_none());
        assert!(vm_skip_reason("[k8s.io] Security Context NamespaceOption runtime should support HostIpc is true")
            .is_some());
        assert!(vm_skip_reason(
            "[k8s.io] Security Context NamespaceOption runtime should support HostNetwork is false"
        )
        .is_none());
        assert!(vm_skip_reason("Container runtime should support basic operations on container").is_none());
        assert!(matches(IMAGE_GROUPS, "[k8s.io] Image Manager public image with tag should be pulled"));
    }

    #[test]
    fn a_failure_keeps_the_runtime_s_reason_that_follows_critest_s_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("r.json");
        let spec = serde_json::json!([{ "SpecReports": [{
            "LeafNodeType": "It",
            "ContainerHierarchyTexts": ["[k8s.io] Container Mount Readonly", "runtime should support readonly mounts"],
            "LeafNodeText": "should support non-recursive readonly mounts",
            "State": "failed",
            "Failure": {
                "Message": "failed to create PodSandbox\nUnexpected error:\n    <*status.Error>: rpc error: code = Unknown desc = the VM ended",
                "FailureNodeType": "BeforeEach"
            }
        }]}]);
        std::fs::write(&report, spec.to_string()).unwrap();
        let r = results(&report).unwrap();
        let (state, msg) = &r["[k8s.io] Container Mount Readonly runtime should support readonly mounts should support non-recursive readonly mounts"];
        assert_eq!(state, "failed");
        assert_eq!(
            msg,
            "in BeforeEach: failed to create PodSandbox Unexpected error: <*status.Error>: rpc error: code = Unknown desc = the VM ended"
        );
        let log = "time=1 level=info msg=a\ntime=2 level=error msg=\"the VM ended\"\ntime=3 level=warning msg=w\n";
        assert_eq!(errors_in(log), ["time=2 level=error msg=\"the VM ended\"", "time=3 level=warning msg=w"]);
    }
}
