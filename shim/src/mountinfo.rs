//! The shim's mount table (`/proc/self/mountinfo`), read as entries: for the cleanup of a
//! dead shim's mounts (`cleanup.rs`) and for the submounts a bind brought along
//! (`mounts.rs`); wisp's tests read other processes' tables with it too
//! (`tests/src/procs.rs`). The table is the kernel's, but the paths in it are host paths
//! that may contain anything but NUL: escapes are decoded, malformed lines skipped.

use std::path::{Path, PathBuf};

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: u64,
    pub parent: u64,
    pub mount_point: PathBuf,
    /// The per-mount `ro` flag (not the filesystem's).
    pub read_only: bool,
    /// The per-mount options (field 6: `ro` or `rw`, `nosuid`, `nodev`, ...; not the
    /// filesystem's super options), in the kernel's order.
    pub options: Vec<String>,
}

/// The entries of a mountinfo text, in its order (the order mounts were made).
pub fn parse(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let (id, parent, mp, opts) = (f.first()?, f.get(1)?, f.get(4)?, f.get(5)?);
            // A mount point is an absolute path; an empty or relative one is a malformed
            // line (kept, it would make `submounts` return absolute paths, which a caller
            // joining them onto a directory would take for host paths).
            let mount_point = PathBuf::from(unescape(mp));
            if !mount_point.is_absolute() {
                return None;
            }
            Some(Entry {
                id: id.parse().ok()?,
                parent: parent.parse().ok()?,
                mount_point,
                read_only: opts.split(',').any(|o| o == "ro"),
                options: opts.split(',').map(String::from).collect(),
            })
        })
        .collect()
}

/// The current mount namespace's entries.
pub fn read() -> std::io::Result<Vec<Entry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The mounts below mount `top` (its children, theirs, ...), parents before children,
/// each with its mount point relative to `top`'s.
pub fn submounts(entries: &[Entry], top: u64) -> Vec<(PathBuf, &Entry)> {
    let Some(root) = entries.iter().find(|e| e.id == top) else { return Vec::new() };
    let mut seen = vec![top];
    let mut ids = vec![top];
    let mut out = Vec::new();
    // One pass per level: parents before children whatever the table's order, and each
    // mount once even if a malformed table has a cycle.
    while !ids.is_empty() {
        let level: Vec<&Entry> = entries.iter().filter(|e| ids.contains(&e.parent) && !seen.contains(&e.id)).collect();
        ids = level.iter().map(|e| e.id).collect();
        seen.extend(&ids);
        for e in level {
            if let Ok(rel) = e.mount_point.strip_prefix(&root.mount_point) {
                out.push((rel.to_path_buf(), e));
            }
        }
    }
    out
}

/// Mount points at or below `dir`, deepest first.
pub fn mount_points_below(entries: &[Entry], dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> =
        entries.iter().map(|e| e.mount_point.clone()).filter(|p| p.starts_with(dir)).collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let code = std::str::from_utf8(&b[i + 1..i + 4]).ok().and_then(|o| u8::from_str_radix(o, 8).ok());
            if let Some(v) = code {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
36 1 0:32 / / rw - ext4 /dev/vda rw
40 36 0:40 / /run/wisp/sb1/shared/c1/rootfs rw,nosuid - overlay overlay rw
41 40 0:41 / /run/wisp/sb1/shared/c1/mounts/3 ro,nosuid,nodev - ext4 /dev/vda rw
44 41 0:44 / /run/wisp/sb1/shared/c1/mounts/3/tmp\\040fs rw,nosuid,nodev - tmpfs none rw
45 44 0:45 / /run/wisp/sb1/shared/c1/mounts/3/tmp\\040fs/deep ro,nosuid,nodev - tmpfs none rw
42 36 0:42 / /run/wisp/sb10/shared/x rw - tmpfs t rw
43 36 0:43 / /run/wisp/sb1/shared/with\\040space rw - tmpfs t rw
not a mount line
";

    #[test]
    fn parses_ids_paths_and_the_per_mount_read_only_flag() {
        let e = parse(INFO);
        assert_eq!(e.len(), 7, "the malformed line is skipped");
        assert_eq!(
            e[2],
            Entry {
                id: 41,
                parent: 40,
                mount_point: "/run/wisp/sb1/shared/c1/mounts/3".into(),
                read_only: true,
                options: vec!["ro".into(), "nosuid".into(), "nodev".into()],
            }
        );
        assert_eq!(e[3].mount_point, PathBuf::from("/run/wisp/sb1/shared/c1/mounts/3/tmp fs"));
        assert!(!e[0].read_only);
    }

    #[test]
    fn keeps_the_per_mount_options_not_the_super_options() {
        let e = parse(INFO);
        assert_eq!(e[0].options, ["rw"]);
        assert_eq!(e[1].options, ["rw", "nosuid"]);
        assert_eq!(e[4].options, ["ro", "nosuid", "nodev"]);
        // Field 6 is per mount; the filesystem's (after `-`) is `rw` on every line here.
        assert!(e.iter().all(|m| m.read_only == m.options.iter().any(|o| o == "ro")));
    }

    #[test]
    fn submounts_are_relative_and_parents_come_first() {
        let e = parse(INFO);
        let subs: Vec<(PathBuf, bool)> = submounts(&e, 41).into_iter().map(|(p, e)| (p, e.read_only)).collect();
        assert_eq!(subs, vec![(PathBuf::from("tmp fs"), false), (PathBuf::from("tmp fs/deep"), true)]);
        assert!(submounts(&e, 45).is_empty());
        assert!(submounts(&e, 999).is_empty());
    }

    /// Found by the `mountinfo` fuzz target: a line with an empty mount point (two spaces
    /// in a row) was kept, and the submounts of that entry came back as absolute paths.
    #[test]
    fn lines_without_an_absolute_mount_point_are_skipped() {
        let e = parse(
            "1 0 0:1 / / rw - t t rw\n2 1 0:2 /  rw - t t rw\n3 1 0:3 / rel/x rw - t t rw\n4 2 0:4 / /x rw - t t rw\n",
        );
        assert_eq!(e.iter().map(|m| m.id).collect::<Vec<_>>(), [1, 4]);
        assert!(submounts(&e, 2).is_empty());
        assert!(submounts(&e, 1).iter().all(|(rel, _)| rel.is_relative()));
    }

    #[test]
    fn a_cyclic_table_ends() {
        let e = parse("1 2 0:1 / /a rw - t t rw\n2 1 0:2 / /a/b rw - t t rw\n");
        assert_eq!(submounts(&e, 1).len(), 1);
    }

    #[test]
    fn finds_mount_points_below_deepest_first() {
        let m = mount_points_below(&parse(INFO), Path::new("/run/wisp/sb1"));
        assert_eq!(
            m,
            vec![
                PathBuf::from("/run/wisp/sb1/shared/c1/mounts/3/tmp fs/deep"),
                PathBuf::from("/run/wisp/sb1/shared/c1/mounts/3/tmp fs"),
                PathBuf::from("/run/wisp/sb1/shared/c1/mounts/3"),
                PathBuf::from("/run/wisp/sb1/shared/c1/rootfs"),
                PathBuf::from("/run/wisp/sb1/shared/with space"),
            ]
        );
    }
}
