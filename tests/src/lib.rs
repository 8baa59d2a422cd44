//! wisp's integration and end-to-end tests: the test runner (`harness`), helpers to
//! find the built artifacts, and the tests themselves under `tests/`.

pub mod bench;
pub mod cni;
pub mod containerd;
pub mod cri;
pub mod ctr;
pub mod harness;
pub mod image;
pub mod pattern;
pub mod process;
pub mod procs;
pub mod rootfs;

use std::path::PathBuf;

/// The workspace root (where `Cargo.toml` and `target/` are).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

/// A built artifact under `target/`, e.g. `artifact("release/wisp-vmm")`.
pub fn artifact(rel: &str) -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    target.join(rel)
}

/// Why a test needing these artifacts (paths under `target/`) cannot run, if one is missing.
pub fn need_built(paths: &[&str]) -> Option<String> {
    paths
        .iter()
        .map(|p| artifact(p))
        .find(|p| !p.exists())
        .map(|p| format!("{} is missing: run `make build guest` first", p.display()))
}

/// A binary of a Go tool set built by `tests/tools/go-tools.sh` (`set` as named in
/// `go-tools.lock`), or why it cannot be used.
pub fn go_tool(set: &str, bin: &str) -> Result<PathBuf, String> {
    let script = workspace_root().join("tests/tools/go-tools.sh");
    let out = std::process::Command::new(&script)
        .args(["bin", set])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("needs {set}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join(bin);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!("{} is missing from the {set} build", path.display()))
    }
}
