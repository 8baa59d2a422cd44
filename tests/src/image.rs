//! A small OCI image built locally from the host's static busybox, so tests, the demo
//! and benchmarks need no registry. The build is reproducible (fixed timestamps and
//! owners, sorted entries): the same busybox gives the same image digest.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use sha2::{Digest, Sha256};

/// The name the image is imported under.
pub const BUSYBOX_IMAGE: &str = "docker.io/library/busybox:wisp";
/// The CRI sandbox ("pause") image: the busybox layer plus `/pause`, a static program
/// that does what Kubernetes' pause does (`PAUSE_C`).
pub const PAUSE_IMAGE: &str = "docker.io/library/wisp-pause:wisp";

/// The pod's PID 1 when containers share the pod's PID namespace (CRI's default
/// NamespaceMode POD, Kubernetes' shareProcessNamespace): it reaps the orphans the
/// containers leave, ends on SIGINT or SIGTERM, and is named `pause`, so a container
/// looking for its own processes by name (critest's `pgrep sleep`) does not find it.
const PAUSE_C: &str = r#"#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void on_stop(int sig) { (void)sig; _exit(0); }
static void on_child(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
    struct sigaction stop = {0}, child = {0};
    stop.sa_handler = on_stop;
    sigaction(SIGINT, &stop, 0);
    sigaction(SIGTERM, &stop, 0);
    child.sa_handler = on_child;
    child.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    sigaction(SIGCHLD, &child, 0);
    for (;;) pause();
}
"#;

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn header(path: &str, size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    let _ = h.set_path(path);
    h
}

/// Tars `root` with fixed metadata; entries sorted so the bytes are reproducible.
fn layer_tar(root: &Path) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let mut paths = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if std::fs::symlink_metadata(&p)?.is_dir() {
                stack.push(p.clone());
            }
            paths.push(p);
        }
    }
    paths.sort();
    let mut b = tar::Builder::new(Vec::new());
    for p in paths {
        let rel = p.strip_prefix(root)?.to_string_lossy().into_owned();
        let meta = std::fs::symlink_metadata(&p)?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let mut h = header(&rel, 0, 0o777, tar::EntryType::Symlink);
            h.set_link_name(std::fs::read_link(&p)?)?;
            h.set_cksum();
            b.append(&h, std::io::empty())?;
        } else if meta.is_dir() {
            let mut h = header(&format!("{rel}/"), 0, mode, tar::EntryType::Directory);
            h.set_cksum();
            b.append(&h, std::io::empty())?;
        } else {
            let data = std::fs::read(&p)?;
            let mut h = header(&rel, data.len() as u64, mode, tar::EntryType::Regular);
            h.set_cksum();
            b.append(&h, data.as_slice())?;
        }
    }
    Ok(b.into_inner()?)
}

/// Writes an OCI image archive (`ctr images import` format) of a busybox rootfs to
/// `out`, tagged `name`, whose command is `sh`. Returns the manifest digest.
pub fn build_busybox_image(out: &Path, name: &str) -> anyhow::Result<String> {
    build_image(out, name, &["sh"])
}

/// Writes the pause image archive (`PAUSE_IMAGE`, command `/pause`) to `out`.
/// Returns the manifest digest.
pub fn build_pause_image(out: &Path) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let pause = compile_static(dir.path(), "pause", PAUSE_C, &[])?;
    build_image_with(out, PAUSE_IMAGE, &["/pause"], &[("pause", &pause, 0o755)])
}

/// Writes a busybox image archive tagged `name` whose command is `cmd`.
pub fn build_image(out: &Path, name: &str, cmd: &[&str]) -> anyhow::Result<String> {
    build_image_with(out, name, cmd, &[])
}

/// Compiles, into `dir`, a static program that prints `euid=E uid=U`: as a setuid-root
/// file in an image it shows whether setuid is honoured (busybox drops setuid for most
/// applets by itself, so it cannot).
pub fn build_euid_probe(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    compile_static(
        dir,
        "euid",
        "#include <stdio.h>\n#include <unistd.h>\n\
         int main(void) { printf(\"euid=%d uid=%d\\n\", (int)geteuid(), (int)getuid()); return 0; }\n",
        &[],
    )
}

/// Compiles the C program `source` into the static, stripped executable `dir/name`
/// (`defines`: `-D` arguments). The same source gives the same bytes, so images holding
/// it stay reproducible. Needs gcc and libc6-dev (`make deps`).
pub fn compile_static(dir: &Path, name: &str, source: &str, defines: &[&str]) -> anyhow::Result<std::path::PathBuf> {
    let src = format!("{name}.c");
    std::fs::write(dir.join(&src), source)?;
    let out = std::process::Command::new("gcc")
        .current_dir(dir)
        .args(["-static", "-Os", "-s"])
        .args(defines.iter().map(|d| format!("-D{d}")))
        .args(["-o", name, &src])
        .output()
        .context("running gcc (make deps installs gcc and libc6-dev)")?;
    if !out.status.success() {
        anyhow::bail!(
            "gcc -static {name}.c failed (make deps installs gcc and libc6-dev): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(dir.join(name))
}

/// Like `build_image`, with extra files copied into the rootfs: (path in the image,
/// host file, mode; setuid and setgid bits are kept, owner root).
pub fn build_image_with(out: &Path, name: &str, cmd: &[&str], extra: &[(&str, &Path, u32)]) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let rootfs = crate::rootfs::busybox_rootfs()?;
    for (rel, from, mode) in extra {
        let to = rootfs.path().join(rel);
        std::fs::copy(from, &to).with_context(|| format!("copying {} into the image", from.display()))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(*mode))?;
    }
    pack_image(out, name, cmd, rootfs.path())
}

/// Writes an OCI image archive of the root filesystem in `root` (one layer) to `out`,
/// tagged `name`, whose command is `cmd`. Returns the manifest digest.
pub fn pack_image(out: &Path, name: &str, cmd: &[&str], root: &Path) -> anyhow::Result<String> {
    let tar = layer_tar(root).context("packing the image's layer")?;
    let diff_id = sha256_hex(&tar);
    let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar)?;
    let layer = gz.finish()?;
    let layer_digest = sha256_hex(&layer);

    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] }
    }))?;
    let config_digest = sha256_hex(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_digest}"), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{layer_digest}"), "size": layer.len() }]
    }))?;
    let manifest_digest = sha256_hex(&manifest);
    let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "annotations": { "io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag }
        }]
    }))?;

    let mut archive = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| -> anyhow::Result<()> {
        let mut h = header(path, data.len() as u64, 0o644, tar::EntryType::Regular);
        h.set_cksum();
        archive.append(&h, data)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    add(&format!("blobs/sha256/{config_digest}"), &config)?;
    add(&format!("blobs/sha256/{layer_digest}"), &layer)?;
    add(&format!("blobs/sha256/{manifest_digest}"), &manifest)?;
    let bytes = archive.into_inner()?;
    std::fs::write(out, bytes).with_context(|| format!("writing {}", out.display()))?;
    Ok(format!("sha256:{manifest_digest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_is_reproducible() {
        // busybox-static is a build dependency (make deps): missing, this fails, not skips.
        if let Some(why) = crate::rootfs::need_busybox() {
            panic!("{why}");
        }
        let d = tempfile::tempdir().unwrap();
        let a = build_busybox_image(&d.path().join("a.tar"), BUSYBOX_IMAGE).unwrap();
        let b = build_busybox_image(&d.path().join("b.tar"), BUSYBOX_IMAGE).unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::read(d.path().join("a.tar")).unwrap(), std::fs::read(d.path().join("b.tar")).unwrap());
        let p1 = build_pause_image(&d.path().join("p1.tar")).unwrap();
        let p2 = build_pause_image(&d.path().join("p2.tar")).unwrap();
        assert_eq!(p1, p2);
        assert_ne!(a, p1, "the pause image must differ from busybox (its command)");
        // The pause program is what the image runs, and it does what its comment says.
        let dir = tempfile::tempdir().unwrap();
        let pause = compile_static(dir.path(), "pause", PAUSE_C, &[]).unwrap();
        let mut child = std::process::Command::new(&pause).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(child.try_wait().unwrap().is_none(), "pause ended by itself");
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert_eq!(child.wait().unwrap().code(), Some(0), "pause does not end with status 0 on SIGTERM");
    }
}
