//! The agent's cgroup v2 statistics as containerd's `io.containerd.cgroups.v2.Metrics`,
//! the type `ctr task metrics` and the CRI ContainerStats decode.

use containerd_shim_protos::cgroups_v2::metrics::{CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat};
use protobuf::well_known_types::any::Any;
use protobuf::Message;
use wisp_protocols::agent::StatsContainerResponse;

pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

pub fn to_metrics(s: &StatsContainerResponse) -> Metrics {
    let mut m = Metrics::new();
    if let Some(c) = s.cpu.as_ref() {
        m.cpu = protobuf::MessageField::some(CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(x) = s.memory.as_ref() {
        m.memory = protobuf::MessageField::some(MemoryStat {
            usage: x.usage,
            usage_limit: x.usage_limit,
            swap_usage: x.swap_usage,
            swap_limit: x.swap_limit,
            anon: x.anon,
            file: x.file,
            kernel_stack: x.kernel_stack,
            slab: x.slab,
            sock: x.sock,
            shmem: x.shmem,
            file_mapped: x.file_mapped,
            file_dirty: x.file_dirty,
            file_writeback: x.file_writeback,
            pgfault: x.pgfault,
            pgmajfault: x.pgmajfault,
            inactive_anon: x.inactive_anon,
            active_anon: x.active_anon,
            inactive_file: x.inactive_file,
            active_file: x.active_file,
            unevictable: x.unevictable,
            ..Default::default()
        });
        m.memory_events =
            protobuf::MessageField::some(MemoryEvents { oom: x.oom_events, oom_kill: x.oom_kill_events, ..Default::default() });
    }
    if let Some(p) = s.pids.as_ref() {
        m.pids = protobuf::MessageField::some(PidsStat { current: p.current, limit: p.limit, ..Default::default() });
    }
    // Always present, as in a cgroup v2 runc reads: no entries when the guest reported
    // no device IO (clients such as `nerdctl stats` read it unconditionally).
    {
        let usage = s
            .io
            .iter()
            .map(|e| IOEntry {
                major: e.major,
                minor: e.minor,
                rbytes: e.rbytes,
                wbytes: e.wbytes,
                rios: e.rios,
                wios: e.wios,
                ..Default::default()
            })
            .collect();
        m.io = protobuf::MessageField::some(IOStat { usage, ..Default::default() });
    }
    m
}

pub fn to_any(m: &Metrics) -> Result<Any, protobuf::Error> {
    Ok(Any { type_url: METRICS_TYPE_URL.to_string(), value: m.write_to_bytes()?, ..Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wisp_protocols::agent::{CpuStats, MemoryStats};

    #[test]
    fn maps_cpu_and_memory() {
        let s = StatsContainerResponse {
            cpu: protobuf::MessageField::some(CpuStats { usage_usec: 42, ..Default::default() }),
            memory: protobuf::MessageField::some(MemoryStats { usage: 4096, oom_kill_events: 1, ..Default::default() }),
            ..Default::default()
        };
        let m = to_metrics(&s);
        assert_eq!(m.cpu.usage_usec, 42);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory_events.oom_kill, 1);
        assert!(m.pids.is_none());
        assert!(m.io.is_some() && m.io.usage.is_empty(), "io present, without entries: {:?}", m.io);
        let any = to_any(&m).unwrap();
        assert_eq!(any.type_url, METRICS_TYPE_URL);
        assert_eq!(Metrics::parse_from_bytes(&any.value).unwrap().cpu.usage_usec, 42);
    }
}
