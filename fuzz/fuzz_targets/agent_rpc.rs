//! The agent's checks of what the shim sends, as the agent runs them before it acts
//! (`wisp_agent::spec`, `wisp_agent::network::check_*`): each request decoded from its
//! protobuf bytes as ttrpc hands it over, then its ids, its OCI spec or process JSON
//! (parsed and rewritten for both pod roles), its resources JSON, its interface or
//! routes. The first byte picks the request. Properties: no panic, no hang; a spec the
//! agent accepts gets an absolute cgroup path, and a cgroupsPath never climbs with `..`.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use protobuf::Message;
use wisp_agent::network::{check_interface, check_routes};
use wisp_agent::spec::{self, PodRole, SpecPolicy};
use wisp_protocols::agent::{
    CreateContainerRequest, CreateSandboxRequest, ExecProcessRequest, UpdateContainerRequest, UpdateInterfaceRequest,
    UpdateRoutesRequest,
};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, bytes)) = data.split_first() else { return };
    match sel % 7 {
        0 => {
            let Ok(r) = CreateContainerRequest::parse_from_bytes(bytes) else { return };
            if spec::validate_id("container", &r.container_id).is_err() {
                return;
            }
            let Ok(parsed) = spec::parse_spec(&r.oci_spec_json) else { return };
            let terminal = r.stdio.as_ref().is_some_and(|s| s.terminal);
            for guest in [false, true] {
                let policy = SpecPolicy { guest, cgroup_parent: "/wisp".into() };
                for role in [PodRole::Sandbox, PodRole::Member { sandbox_pid: Some(1) }] {
                    if let Ok(p) = spec::prepare(parsed.clone(), &r.container_id, &policy, role, terminal) {
                        assert!(p.cgroup_path.is_absolute(), "{:?}", p.cgroup_path);
                        let _ = spec::sysctl_path(&p.net_sysctls.first().map(|(k, _)| k.clone()).unwrap_or_default());
                    }
                }
            }
        }
        1 => {
            let Ok(r) = ExecProcessRequest::parse_from_bytes(bytes) else { return };
            let _ = spec::validate_id("exec", &r.exec_id);
            if let Ok(p) = spec::parse_process(&r.process_json) {
                let _ = spec::prepare_exec_process(p, r.stdio.as_ref().is_some_and(|s| s.terminal));
            }
        }
        2 => {
            let Ok(r) = UpdateContainerRequest::parse_from_bytes(bytes) else { return };
            let _ = spec::parse_resources(&r.resources_json);
        }
        3 => {
            let Ok(r) = UpdateInterfaceRequest::parse_from_bytes(bytes) else { return };
            if let Some(iface) = r.interface.as_ref() {
                if let Ok(checked) = check_interface(iface) {
                    assert!(checked.addresses.iter().all(|(a, p)| *p <= if a.is_ipv4() { 32 } else { 128 }));
                }
            }
        }
        4 => {
            let Ok(r) = UpdateRoutesRequest::parse_from_bytes(bytes) else { return };
            if let Ok(routes) = check_routes(&r.routes) {
                assert_eq!(routes.len(), r.routes.len());
            }
        }
        5 => {
            let Ok(r) = CreateSandboxRequest::parse_from_bytes(bytes) else { return };
            let _ = spec::validate_id("sandbox", &r.sandbox_id);
        }
        _ => {
            // A spec's linux.cgroupsPath: never above the cgroup root, never relative.
            let Ok(s) = std::str::from_utf8(bytes) else { return };
            if let Ok(p) = spec::cgroup_path(Some(Path::new(s)), "c1", Path::new("/wisp")) {
                assert!(p.is_absolute(), "{p:?}");
                assert!(!p.components().any(|c| c == Component::ParentDir), "{p:?}");
            }
        }
    }
});
