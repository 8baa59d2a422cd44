//! The CNI bridge network the pod-network suites (`cri_net`, `crictl`, `nerdctl`) give
//! containerd or nerdctl: a bridge with the gateway on the host side (no masquerading:
//! nothing leaves the host), host-local addresses with a default route, and loopback,
//! from Debian's containernetworking-plugins.

use std::path::Path;
use std::process::Command;

/// The network's name (host-local keeps its reservations in a directory of that name),
/// the host bridge, the subnet and its gateway (the bridge's address).
pub const NET_NAME: &str = "wisp-cri-net";
pub const BRIDGE: &str = "wispbr0";
pub const SUBNET: &str = "10.88.0.0/24";
pub const GATEWAY: &str = "10.88.0.1";
pub const CNI_BIN: &str = "/usr/lib/cni";
pub const HOST_LOCAL_DIR: &str = "/var/lib/cni/networks";
/// The MTU the bridge plugin gives a veth when the config names none.
pub const CNI_MTU: u64 = 1500;

/// The network config (a conflist).
pub fn conflist() -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": NET_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": SUBNET, "gateway": GATEWAY }]],
                    "routes": [{ "dst": "0.0.0.0/0" }]
                }
            },
            { "type": "loopback" }
        ]
    })
    .to_string()
}

/// The CNI plugins and the host tools the checks use.
pub fn need_cni() -> Option<String> {
    for p in ["bridge", "host-local", "loopback"] {
        let bin = Path::new(CNI_BIN).join(p);
        if !bin.exists() {
            return Some(format!("needs {} (Debian package containernetworking-plugins)", bin.display()));
        }
    }
    for (tool, arg, pkg) in [("ip", "-V", "iproute2"), ("tc", "-V", "iproute2"), ("nsenter", "--version", "util-linux")]
    {
        if !Command::new(tool).arg(arg).output().is_ok_and(|o| o.status.success()) {
            return Some(format!("needs `{tool}` on the host (Debian package {pkg})"));
        }
    }
    None
}

/// Deletes the bridge (the first pod's CNI ADD makes it again).
pub fn delete_bridge() {
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        match Command::new("ip").args(["link", "del", BRIDGE]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("cni: deleting {BRIDGE}: {}", String::from_utf8_lossy(&o.stderr).trim()),
            Err(e) => eprintln!("cni: deleting {BRIDGE}: {e}"),
        }
    }
}

/// What an earlier run left (a case killed halfway) would confuse the checks: the
/// network's address reservations and its bridge go.
pub fn reset() {
    let _ = std::fs::remove_dir_all(Path::new(HOST_LOCAL_DIR).join(NET_NAME));
    delete_bridge();
}

/// The body of `GET path` from `ip:port` (HTTP/1.0, at most 10 s a step): how the
/// suites reach a pod's web server from the host.
pub fn http_get(ip: &str, port: u16, path: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::{Read, Write};
    use std::time::Duration;
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n")?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let (head, body) = reply.split_once("\r\n\r\n").with_context(|| format!("no HTTP reply: {reply:?}"))?;
    if !(head.starts_with("HTTP/1.") && head.contains(" 200 ")) {
        anyhow::bail!("HTTP status: {head:?}");
    }
    Ok(body.to_string())
}
