//! What a snapshot may be restored on: the wisp-vmm build that wrote it, the host
//! kernel it ran on, the CPU (model and the CPUID table guests are given) and the VM's
//! configuration as the caller describes it. A restore compares the snapshot's header
//! with one made the same way here and now (`Header::check_restorable`); any difference
//! refuses the snapshot with a `Mismatch` naming both sides.
//!
//! Why each: the build, because device and vCPU state is only meaningful to the code
//! that wrote it; the kernel, because the KVM state structs, the MSRs it offers and its
//! handling of them come from it; the CPU, because a guest that saw one CPUID table
//! (and XSAVE layout) must not run on a CPU offering another; the configuration,
//! because guest memory and devices must be laid out as the guest last saw them.

use std::fmt::Write;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use super::codec::{FieldError, Reader, Writer};
use super::kvm_structs::{get_cpuid, put_cpuid};
use crate::arch::cpuid;

/// Bounds on what a header holds (the format refuses more).
pub const MAX_VERSION_LEN: usize = 32;
pub const MAX_BUILD_ID_LEN: usize = 128;
pub const MAX_KERNEL_LEN: usize = 256;
pub const MAX_VENDOR_LEN: usize = 16;
pub const MAX_CONFIG_ENTRIES: usize = 128;
pub const MAX_CONFIG_KEY_LEN: usize = 64;
pub const MAX_CONFIG_VALUE_LEN: usize = 1024;

/// The build id `build.rs` computed: a hash of the VMM's sources and the lock file,
/// e.g. `src.3f2a9d0c11223344`.
pub const BUILD_ID: &str = env!("WISP_VMM_BUILD_ID");

/// The wisp-vmm build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildIdentity {
    pub version: String,
    pub build_id: String,
}

impl BuildIdentity {
    pub fn this_build() -> Self {
        Self { version: env!("CARGO_PKG_VERSION").into(), build_id: BUILD_ID.into() }
    }
}

impl std::fmt::Display for BuildIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.version, self.build_id)
    }
}

/// The host CPU: its model, and the CPUID table wisp-vmm gives a guest on it (vCPU 0
/// of a one-vCPU VM: the per-vCPU topology fields are the configuration's business).
#[derive(Debug, Clone, PartialEq)]
pub struct CpuIdentity {
    pub vendor: String,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    pub guest_cpuid: Vec<kvm_cpuid_entry2>,
}

impl CpuIdentity {
    /// This host's CPU, with the guest CPUID table made from `supported`
    /// (KVM_GET_SUPPORTED_CPUID) the way `Vcpu::configure` makes it.
    pub fn of_host(supported: &CpuId, tsc_deadline: bool) -> Self {
        let mut table = supported.clone();
        cpuid::filter_for_vcpu(&mut table, 0, 1, tsc_deadline);
        let mut guest_cpuid = table.as_slice().to_vec();
        guest_cpuid.truncate(super::kvm_structs::MAX_CPUID_ENTRIES);
        let (vendor, family, model, stepping) = host_cpu_model();
        Self { vendor, family, model, stepping, guest_cpuid }
    }

    fn model_name(&self) -> String {
        format!("{} family {:#x} model {:#x} stepping {}", self.vendor, self.family, self.model, self.stepping)
    }
}

/// Vendor string and display family/model/stepping from the CPUID instruction.
fn host_cpu_model() -> (String, u32, u32, u32) {
    use std::arch::x86_64::__cpuid;
    // SAFETY (for toolchains where __cpuid is unsafe): CPUID exists on every x86_64 CPU.
    #[allow(unused_unsafe)]
    let (l0, l1) = unsafe { (__cpuid(0), __cpuid(1)) };
    let mut vendor = Vec::with_capacity(12);
    for r in [l0.ebx, l0.edx, l0.ecx] {
        vendor.extend_from_slice(&r.to_le_bytes());
    }
    let vendor = String::from_utf8_lossy(&vendor).trim_end_matches('\0').to_string();
    let eax = l1.eax;
    let base_family = (eax >> 8) & 0xf;
    let mut family = base_family;
    let mut model = (eax >> 4) & 0xf;
    if base_family == 0xf {
        family += (eax >> 20) & 0xff;
    }
    if base_family == 0x6 || base_family == 0xf {
        model |= ((eax >> 16) & 0xf) << 4;
    }
    (vendor, family, model, eax & 0xf)
}

/// The release of the running kernel (`uname -r`).
pub fn host_kernel_release() -> std::io::Result<String> {
    // SAFETY: utsname is plain data; uname fills it or fails.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let bytes: Vec<u8> = u.release.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The VM's configuration as the caller describes it: named items (`vcpus`,
/// `memory_mib`, `kernel` as a content hash, one per device, ...) compared one by one,
/// so a mismatch says which item differs. Keys are unique.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmIdentity {
    entries: Vec<(String, String)>,
}

impl VmIdentity {
    pub fn new<K: Into<String>, V: Into<String>>(items: impl IntoIterator<Item = (K, V)>) -> Result<Self, FieldError> {
        let entries: Vec<(String, String)> = items.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        Self::checked(entries)
    }

    fn checked(entries: Vec<(String, String)>) -> Result<Self, FieldError> {
        if entries.len() > MAX_CONFIG_ENTRIES {
            return Err(FieldError::TooMany {
                what: "configuration items",
                count: entries.len(),
                max: MAX_CONFIG_ENTRIES,
            });
        }
        for (i, (k, v)) in entries.iter().enumerate() {
            if k.len() > MAX_CONFIG_KEY_LEN {
                return Err(FieldError::TooMany {
                    what: "configuration key bytes",
                    count: k.len(),
                    max: MAX_CONFIG_KEY_LEN,
                });
            }
            if v.len() > MAX_CONFIG_VALUE_LEN {
                let (count, max) = (v.len(), MAX_CONFIG_VALUE_LEN);
                return Err(FieldError::TooMany { what: "configuration value bytes", count, max });
            }
            if entries[..i].iter().any(|(other, _)| other == k) {
                return Err(FieldError::DuplicateKey(k.clone()));
            }
        }
        Ok(Self { entries })
    }

    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Everything a snapshot must match to be restored.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub build: BuildIdentity,
    pub host_kernel: String,
    pub cpu: CpuIdentity,
    pub config: VmIdentity,
}

impl Header {
    /// The header a snapshot made here and now, of a VM configured as `config`, gets.
    pub fn this_host(supported: &CpuId, tsc_deadline: bool, config: VmIdentity) -> std::io::Result<Self> {
        Ok(Self {
            build: BuildIdentity::this_build(),
            host_kernel: host_kernel_release()?,
            cpu: CpuIdentity::of_host(supported, tsc_deadline),
            config,
        })
    }

    /// Whether a snapshot with this header may be restored where `here` describes: the
    /// first difference, in the order build, kernel, CPU model, CPUID, configuration.
    pub fn check_restorable(&self, here: &Header) -> Result<(), Mismatch> {
        if self.build != here.build {
            return Err(Mismatch::Build { snapshot: self.build.clone(), here: here.build.clone() });
        }
        if self.host_kernel != here.host_kernel {
            return Err(Mismatch::Kernel { snapshot: self.host_kernel.clone(), here: here.host_kernel.clone() });
        }
        let (s, h) = (&self.cpu, &here.cpu);
        if (&s.vendor, s.family, s.model, s.stepping) != (&h.vendor, h.family, h.model, h.stepping) {
            return Err(Mismatch::CpuModel { snapshot: s.model_name(), here: h.model_name() });
        }
        if let Some(differences) = cpuid_differences(&s.guest_cpuid, &h.guest_cpuid) {
            return Err(Mismatch::CpuFeatures(differences));
        }
        if let Some(differences) = config_differences(&self.config, &here.config) {
            return Err(Mismatch::Config(differences));
        }
        Ok(())
    }

    pub(crate) fn encode(&self, w: &mut Writer) {
        w.str(&self.build.version);
        w.str(&self.build.build_id);
        w.str(&self.host_kernel);
        w.str(&self.cpu.vendor);
        w.u32(self.cpu.family);
        w.u32(self.cpu.model);
        w.u32(self.cpu.stepping);
        put_cpuid(w, &self.cpu.guest_cpuid);
        w.count(self.config.entries.len());
        for (k, v) in &self.config.entries {
            w.str(k);
            w.str(v);
        }
    }

    pub(crate) fn decode(r: &mut Reader) -> Result<Self, FieldError> {
        let build = BuildIdentity {
            version: r.str(MAX_VERSION_LEN, "wisp-vmm version")?,
            build_id: r.str(MAX_BUILD_ID_LEN, "wisp-vmm build id")?,
        };
        let host_kernel = r.str(MAX_KERNEL_LEN, "host kernel release")?;
        let cpu = CpuIdentity {
            vendor: r.str(MAX_VENDOR_LEN, "CPU vendor")?,
            family: r.u32("CPU family")?,
            model: r.u32("CPU model")?,
            stepping: r.u32("CPU stepping")?,
            guest_cpuid: get_cpuid(r, "guest CPUID")?,
        };
        // Each item takes at least its two length prefixes.
        let n = r.count(MAX_CONFIG_ENTRIES, 4, "configuration items")?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let k = r.str(MAX_CONFIG_KEY_LEN, "configuration key")?;
            let v = r.str(MAX_CONFIG_VALUE_LEN, "configuration value")?;
            entries.push((k, v));
        }
        Ok(Self { build, host_kernel, cpu, config: VmIdentity::checked(entries)? })
    }
}

/// Why a snapshot may not be restored here. Each names the snapshot's side, then this
/// host's (or this VM's).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Mismatch {
    #[error("snapshot made by wisp-vmm {snapshot}, this is {here}")]
    Build { snapshot: BuildIdentity, here: BuildIdentity },
    #[error("snapshot made on kernel {snapshot}, this host runs {here}")]
    Kernel { snapshot: String, here: String },
    #[error("CPU model mismatch: snapshot made on {snapshot}, this host has {here}")]
    CpuModel { snapshot: String, here: String },
    #[error(
        "CPU features differ (the guest CPUID table KVM offers here is not the one the snapshot's guest saw): {0}"
    )]
    CpuFeatures(String),
    #[error("configuration differs: {0}")]
    Config(String),
}

/// At most this many differences are spelled out; the rest are counted.
const MAX_LISTED: usize = 6;

fn listed(mut items: Vec<String>) -> Option<String> {
    if items.is_empty() {
        return None;
    }
    let more = items.len().saturating_sub(MAX_LISTED);
    items.truncate(MAX_LISTED);
    let mut out = items.join("; ");
    if more > 0 {
        let _ = write!(out, "; and {more} more");
    }
    Some(out)
}

fn cpuid_differences(snapshot: &[kvm_cpuid_entry2], here: &[kvm_cpuid_entry2]) -> Option<String> {
    if snapshot == here {
        return None;
    }
    let key = |e: &kvm_cpuid_entry2| (e.function, e.index);
    let find = |t: &[kvm_cpuid_entry2], k| t.iter().find(|e| key(e) == k).copied();
    let mut items = Vec::new();
    for s in snapshot {
        let leaf = format!("leaf {:#x}.{}", s.function, s.index);
        match find(here, key(s)) {
            None => items.push(format!("{leaf} only in the snapshot")),
            Some(h) => {
                let mut regs = Vec::new();
                for (name, a, b) in
                    [("flags", s.flags, h.flags), ("eax", s.eax, h.eax), ("ebx", s.ebx, h.ebx), ("ecx", s.ecx, h.ecx)]
                        .into_iter()
                        .chain([("edx", s.edx, h.edx)])
                {
                    if a != b {
                        regs.push(format!("{name} snapshot {a:#010x}, here {b:#010x}"));
                    }
                }
                if !regs.is_empty() {
                    items.push(format!("{leaf}: {}", regs.join(", ")));
                }
            }
        }
    }
    for h in here {
        if find(snapshot, key(h)).is_none() {
            items.push(format!("leaf {:#x}.{} only on this host", h.function, h.index));
        }
    }
    // Leaf by leaf the same, but not as tables: a leaf repeated, or another order.
    listed(items).or_else(|| Some("the same leaves, repeated or in another order".into()))
}

fn config_differences(snapshot: &VmIdentity, here: &VmIdentity) -> Option<String> {
    let mut items = Vec::new();
    for (k, v) in &snapshot.entries {
        match here.get(k) {
            None => items.push(format!("{k}: snapshot {v}, this VM has none")),
            Some(h) if h != v => items.push(format!("{k}: snapshot {v}, this VM {h}")),
            Some(_) => {}
        }
    }
    for (k, v) in &here.entries {
        if snapshot.get(k).is_none() {
            items.push(format!("{k}: the snapshot has none, this VM {v}"));
        }
    }
    listed(items)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Header {
        let leaf = |function, eax| kvm_cpuid_entry2 { function, eax, ..Default::default() };
        Header {
            build: BuildIdentity { version: "0.1.0".into(), build_id: "abc123+src.0011223344556677".into() },
            host_kernel: "6.12.9-amd64".into(),
            cpu: CpuIdentity {
                vendor: "GenuineIntel".into(),
                family: 6,
                model: 0x8f,
                stepping: 8,
                guest_cpuid: vec![leaf(0, 0x1f), leaf(1, 0x806f8), leaf(7, 0)],
            },
            config: VmIdentity::new([("vcpus", "2"), ("memory_mib", "256"), ("kernel", "sha256:aa")]).unwrap(),
        }
    }

    #[test]
    fn the_same_header_is_restorable() {
        sample().check_restorable(&sample()).unwrap();
    }

    #[test]
    fn another_build_is_refused_naming_both() {
        let mut here = sample();
        here.build.build_id = "def456+src.8899aabbccddeeff".into();
        let e = sample().check_restorable(&here).unwrap_err();
        assert_eq!(
            e.to_string(),
            "snapshot made by wisp-vmm 0.1.0 (abc123+src.0011223344556677), this is 0.1.0 (def456+src.8899aabbccddeeff)"
        );
        here = sample();
        here.build.version = "0.2.0".into();
        assert!(matches!(sample().check_restorable(&here), Err(Mismatch::Build { .. })));
    }

    #[test]
    fn another_kernel_is_refused_naming_both() {
        let mut here = sample();
        here.host_kernel = "6.18.44".into();
        let e = sample().check_restorable(&here).unwrap_err();
        assert_eq!(e.to_string(), "snapshot made on kernel 6.12.9-amd64, this host runs 6.18.44");
    }

    #[test]
    fn another_cpu_model_is_refused_naming_both() {
        let mut here = sample();
        here.cpu.model = 0x6a;
        let e = sample().check_restorable(&here).unwrap_err();
        assert_eq!(
            e.to_string(),
            "CPU model mismatch: snapshot made on GenuineIntel family 0x6 model 0x8f stepping 8, \
             this host has GenuineIntel family 0x6 model 0x6a stepping 8"
        );
        here = sample();
        here.cpu.vendor = "AuthenticAMD".into();
        assert!(sample().check_restorable(&here).unwrap_err().to_string().contains("this host has AuthenticAMD"));
    }

    #[test]
    fn other_cpu_features_are_refused_naming_the_leaves() {
        let mut here = sample();
        here.cpu.guest_cpuid[2].ebx = 0x20;
        here.cpu.guest_cpuid.remove(0);
        here.cpu.guest_cpuid.push(kvm_cpuid_entry2 { function: 0xd, index: 1, ..Default::default() });
        let e = sample().check_restorable(&here).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Mismatch::CpuFeatures(_)), "{msg}");
        assert!(msg.contains("leaf 0x0.0 only in the snapshot"), "{msg}");
        assert!(msg.contains("leaf 0x7.0: ebx snapshot 0x00000000, here 0x00000020"), "{msg}");
        assert!(msg.contains("leaf 0xd.1 only on this host"), "{msg}");
    }

    #[test]
    fn a_cpuid_table_with_repeated_leaves_is_compared_as_a_table() {
        // A hand-made header may repeat a leaf: it still matches itself (found by the
        // fuzz target), and not a table without the repeat.
        let mut h = sample();
        let mut second = h.cpu.guest_cpuid[1];
        second.function = 0;
        h.cpu.guest_cpuid.push(second);
        h.check_restorable(&h).unwrap();
        let e = h.check_restorable(&sample()).unwrap_err();
        assert!(matches!(e, Mismatch::CpuFeatures(_)), "{e}");
        let mut reordered = sample();
        reordered.cpu.guest_cpuid.reverse();
        let e = sample().check_restorable(&reordered).unwrap_err();
        assert_eq!(e, Mismatch::CpuFeatures("the same leaves, repeated or in another order".into()));
    }

    #[test]
    fn another_configuration_is_refused_naming_the_items() {
        let mut here = sample();
        here.config = VmIdentity::new([("vcpus", "1"), ("memory_mib", "256"), ("net0", "02:00:00:00:00:01")]).unwrap();
        let e = sample().check_restorable(&here).unwrap_err();
        assert_eq!(
            e.to_string(),
            "configuration differs: vcpus: snapshot 2, this VM 1; kernel: snapshot sha256:aa, this VM has none; \
             net0: the snapshot has none, this VM 02:00:00:00:00:01"
        );
    }

    #[test]
    fn long_lists_of_differences_are_cut() {
        let mut here = sample();
        here.config = VmIdentity::new((0..10).map(|i| (format!("disk{i}"), "x"))).unwrap();
        let msg = sample().check_restorable(&here).unwrap_err().to_string();
        assert!(msg.ends_with("; and 7 more"), "{msg}");
    }

    #[test]
    fn configuration_items_are_bounded_and_unique() {
        assert_eq!(VmIdentity::new([("a", "1"), ("a", "2")]).unwrap_err(), FieldError::DuplicateKey("a".into()));
        let long = "x".repeat(MAX_CONFIG_VALUE_LEN + 1);
        assert!(VmIdentity::new([("a", long.as_str())]).is_err());
        assert!(VmIdentity::new((0..=MAX_CONFIG_ENTRIES).map(|i| (i.to_string(), ""))).is_err());
    }

    #[test]
    fn header_round_trips_byte_for_byte() {
        let h = sample();
        let mut w = Writer::new();
        h.encode(&mut w);
        let bytes = w.into_bytes();
        let mut r = Reader::new(&bytes);
        let back = Header::decode(&mut r).unwrap();
        r.finish().unwrap();
        assert_eq!(back, h);
        let mut w = Writer::new();
        back.encode(&mut w);
        assert_eq!(w.into_bytes(), bytes);
    }

    #[test]
    fn this_host_has_a_build_a_kernel_and_a_cpu() {
        let supported = CpuId::from_entries(&[kvm_cpuid_entry2 { function: 1, ..Default::default() }]).unwrap();
        let h = Header::this_host(&supported, true, VmIdentity::default()).unwrap();
        assert_eq!(h.build.version, env!("CARGO_PKG_VERSION"));
        assert!(h.build.build_id.starts_with("src.") && h.build.build_id.len() == 20, "{}", h.build.build_id);
        assert!(!h.host_kernel.is_empty());
        assert!(!h.cpu.vendor.is_empty());
        // The guest's table went through the VMM's own filter (hypervisor bit set).
        assert_ne!(h.cpu.guest_cpuid[0].ecx & (1 << 31), 0);
    }
}
