//! Container statistics in the protocol's shape (containerd's v2 metrics).
//!
//! cgroup v2 (the guest): read straight from the container's cgroup files, so the
//! mapping is visible and unit-tested on sample files. cgroup v1 (only hosts running
//! the agent in test mode): mapped from libcgroups' v1 statistics.
//!
//! Trusts: the kernel's cgroup files; unknown or malformed lines are skipped, missing
//! files read as zero (a controller may not be enabled).

use std::collections::HashMap;
use std::path::Path;

use wisp_protocols::agent::{CpuStats, IoEntry, MemoryStats, PidsStats, StatsContainerResponse};

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("cgroup {0} does not exist (container stopped and removed?)")]
    NoCgroup(String),
}

/// "key value" lines (cpu.stat, memory.stat, memory.events).
pub fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_string(), v))
        })
        .collect()
}

/// A single value file; "max" means unlimited and maps to `max_as`.
pub fn parse_single(text: &str, max_as: u64) -> u64 {
    let t = text.trim();
    if t == "max" {
        return max_as;
    }
    t.parse().unwrap_or(0)
}

/// io.stat: "MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ..." per device.
pub fn parse_io_stat(text: &str) -> Vec<IoEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let Some(dev) = it.next() else { continue };
        let Some((maj, min)) = dev.split_once(':') else { continue };
        let (Ok(major), Ok(minor)) = (maj.parse(), min.parse()) else { continue };
        let mut e = IoEntry { major, minor, ..Default::default() };
        for kv in it {
            let Some((k, v)) = kv.split_once('=') else { continue };
            let v: u64 = v.parse().unwrap_or(0);
            match k {
                "rbytes" => e.rbytes = v,
                "wbytes" => e.wbytes = v,
                "rios" => e.rios = v,
                "wios" => e.wios = v,
                _ => {}
            }
        }
        out.push(e);
    }
    out
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap_or_default()
}

/// Reads a cgroup v2 directory.
pub fn read_v2(dir: &Path) -> Result<StatsContainerResponse, StatsError> {
    if !dir.is_dir() {
        return Err(StatsError::NoCgroup(dir.display().to_string()));
    }
    let cpu = parse_flat_keyed(&read(dir, "cpu.stat"));
    let g = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    let cpu_stats = CpuStats {
        usage_usec: g(&cpu, "usage_usec"),
        user_usec: g(&cpu, "user_usec"),
        system_usec: g(&cpu, "system_usec"),
        nr_periods: g(&cpu, "nr_periods"),
        nr_throttled: g(&cpu, "nr_throttled"),
        throttled_usec: g(&cpu, "throttled_usec"),
        ..Default::default()
    };
    let ms = parse_flat_keyed(&read(dir, "memory.stat"));
    let ev = parse_flat_keyed(&read(dir, "memory.events"));
    let memory = MemoryStats {
        usage: parse_single(&read(dir, "memory.current"), 0),
        usage_limit: parse_single(&read(dir, "memory.max"), u64::MAX),
        swap_usage: parse_single(&read(dir, "memory.swap.current"), 0),
        swap_limit: parse_single(&read(dir, "memory.swap.max"), u64::MAX),
        anon: g(&ms, "anon"),
        file: g(&ms, "file"),
        kernel_stack: g(&ms, "kernel_stack"),
        slab: g(&ms, "slab"),
        sock: g(&ms, "sock"),
        shmem: g(&ms, "shmem"),
        file_mapped: g(&ms, "file_mapped"),
        file_dirty: g(&ms, "file_dirty"),
        file_writeback: g(&ms, "file_writeback"),
        pgfault: g(&ms, "pgfault"),
        pgmajfault: g(&ms, "pgmajfault"),
        inactive_anon: g(&ms, "inactive_anon"),
        active_anon: g(&ms, "active_anon"),
        inactive_file: g(&ms, "inactive_file"),
        active_file: g(&ms, "active_file"),
        unevictable: g(&ms, "unevictable"),
        oom_events: g(&ev, "oom"),
        oom_kill_events: g(&ev, "oom_kill"),
        ..Default::default()
    };
    let pids = PidsStats {
        current: parse_single(&read(dir, "pids.current"), 0),
        // containerd reports an unlimited pids.max as 0.
        limit: parse_single(&read(dir, "pids.max"), 0),
        ..Default::default()
    };
    Ok(StatsContainerResponse {
        cpu: Some(cpu_stats).into(),
        memory: Some(memory).into(),
        pids: Some(pids).into(),
        io: parse_io_stat(&read(dir, "io.stat")),
        ..Default::default()
    })
}

/// Maps libcgroups' (v1) statistics; `oom_kills` comes from memory.oom_control.
pub fn from_libcgroups(s: &libcgroups::stats::Stats, oom_kills: u64) -> StatsContainerResponse {
    let ns_to_us = |ns: u64| ns / 1000;
    let st = &s.memory.stats;
    let g = |k: &str| st.get(k).copied().unwrap_or(0);
    let cpu = CpuStats {
        usage_usec: ns_to_us(s.cpu.usage.usage_total),
        user_usec: ns_to_us(s.cpu.usage.usage_user),
        system_usec: ns_to_us(s.cpu.usage.usage_kernel),
        nr_periods: s.cpu.throttling.periods,
        nr_throttled: s.cpu.throttling.throttled_periods,
        throttled_usec: ns_to_us(s.cpu.throttling.throttled_time),
        ..Default::default()
    };
    let memory = MemoryStats {
        usage: s.memory.memory.usage,
        usage_limit: s.memory.memory.limit,
        swap_usage: s.memory.memswap.usage.saturating_sub(s.memory.memory.usage),
        swap_limit: s.memory.memswap.limit,
        anon: g("rss"),
        file: g("cache"),
        shmem: g("shmem"),
        file_mapped: g("mapped_file"),
        file_dirty: g("dirty"),
        file_writeback: g("writeback"),
        pgfault: g("pgfault"),
        pgmajfault: g("pgmajfault"),
        inactive_anon: g("inactive_anon"),
        active_anon: g("active_anon"),
        inactive_file: g("inactive_file"),
        active_file: g("active_file"),
        unevictable: g("unevictable"),
        oom_events: s.memory.memory.fail_count,
        oom_kill_events: oom_kills,
        ..Default::default()
    };
    let pids = PidsStats { current: s.pids.current, limit: s.pids.limit, ..Default::default() };
    let mut io: HashMap<(u64, u64), IoEntry> = HashMap::new();
    for (list, bytes) in [(&s.blkio.service_bytes, true), (&s.blkio.serviced, false)] {
        for d in list {
            let e = io.entry((d.major, d.minor)).or_insert_with(|| IoEntry {
                major: d.major,
                minor: d.minor,
                ..Default::default()
            });
            match (d.op_type.as_deref(), bytes) {
                (Some("Read"), true) => e.rbytes = d.value,
                (Some("Write"), true) => e.wbytes = d.value,
                (Some("Read"), false) => e.rios = d.value,
                (Some("Write"), false) => e.wios = d.value,
                _ => {}
            }
        }
    }
    let mut io: Vec<IoEntry> = io.into_values().collect();
    io.sort_by_key(|e| (e.major, e.minor));
    StatsContainerResponse {
        cpu: Some(cpu).into(),
        memory: Some(memory).into(),
        pids: Some(pids).into(),
        io,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_files_map_to_the_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let w = |f: &str, s: &str| std::fs::write(dir.path().join(f), s).unwrap();
        w("cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 7\nnr_throttled 2\nthrottled_usec 30\ncore_sched.force_idle_usec 0\n");
        w("memory.current", "16777216\n");
        w("memory.max", "max\n");
        w("memory.swap.current", "0\n");
        w("memory.stat", "anon 4096\nfile 8192\nkernel_stack 16384\nslab 100\nsock 0\nshmem 12\nfile_mapped 3\nfile_dirty 4\nfile_writeback 5\npgfault 77\npgmajfault 1\ninactive_anon 6\nactive_anon 7\ninactive_file 8\nactive_file 9\nunevictable 10\n");
        w("memory.events", "low 0\nhigh 0\nmax 4\noom 2\noom_kill 1\noom_group_kill 0\n");
        w("pids.current", "3\n");
        w("pids.max", "max\n");
        w("io.stat", "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\nbogus\n253:1 rbytes=1\n");
        let s = read_v2(dir.path()).unwrap();
        let cpu = s.cpu.as_ref().unwrap();
        assert_eq!((cpu.usage_usec, cpu.user_usec, cpu.system_usec), (1500, 1000, 500));
        assert_eq!((cpu.nr_periods, cpu.nr_throttled, cpu.throttled_usec), (7, 2, 30));
        let m = s.memory.as_ref().unwrap();
        assert_eq!(m.usage, 16 << 20);
        assert_eq!(m.usage_limit, u64::MAX);
        assert_eq!(m.swap_limit, 0, "no swap accounting: nothing to report");
        assert_eq!((m.anon, m.file, m.kernel_stack, m.shmem, m.pgfault), (4096, 8192, 16384, 12, 77));
        assert_eq!((m.oom_events, m.oom_kill_events), (2, 1));
        let p = s.pids.as_ref().unwrap();
        assert_eq!((p.current, p.limit), (3, 0));
        assert_eq!(s.io.len(), 2);
        assert_eq!(
            (s.io[0].major, s.io[0].minor, s.io[0].rbytes, s.io[0].wbytes, s.io[0].rios, s.io[0].wios),
            (8, 0, 4096, 8192, 1, 2)
        );
        assert_eq!((s.io[1].major, s.io[1].rbytes), (253, 1));
    }

    #[test]
    fn missing_cgroup_is_an_error_and_missing_files_are_zero() {
        assert!(matches!(read_v2(Path::new("/nonexistent/cgroup")), Err(StatsError::NoCgroup(_))));
        let dir = tempfile::tempdir().unwrap();
        let s = read_v2(dir.path()).unwrap();
        assert_eq!(s.cpu.as_ref().unwrap().usage_usec, 0);
        assert_eq!(parse_single("garbage", 5), 0);
        assert_eq!(parse_single("max", 5), 5);
        assert!(parse_flat_keyed("a\nb x\nc 3").len() == 1);
    }
}
