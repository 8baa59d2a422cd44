//! A small CRI v1 client for end-to-end tests: the kubelet's calls (RunPodSandbox,
//! CreateContainer, ExecSync, ...) over containerd's Unix socket with tonic, each with a
//! deadline, and builders for the pod and container configs the kubelet would send.
//! Also the CRI container log format and the CNI configs the tests hand containerd.
//!
//! The client is blocking (a current-thread tokio runtime inside), like the rest of the
//! harness.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as api;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub use k8s_cri::v1;

/// Deadline of calls that may boot, stop or tear down a pod's VM (slow under TCG).
pub const POD_TIMEOUT: Duration = Duration::from_secs(300);
/// Deadline of calls that only read or change state.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The Kubernetes namespace of the test pods (pod metadata only).
pub const POD_NAMESPACE: &str = "wisp-test";

/// A CRI client to `c`, once the images the CRI tests use are imported into `c` and
/// the CRI plugin lists them (it learns of them from containerd's events); the image's
/// name. `who` prefixes the version line printed.
pub fn connect_with_images(c: &crate::containerd::Containerd, who: &str) -> anyhow::Result<(Cri, String)> {
    use crate::image::PAUSE_IMAGE;
    let image = c.import_cri_images()?;
    let cri = Cri::connect(&c.socket)?;
    let v = cri.version()?;
    eprintln!("{who}: {} {} (CRI {})", v.runtime_name, v.runtime_version, v.runtime_api_version);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(cri.image_present(&image)? && cri.image_present(PAUSE_IMAGE)?) {
        if Instant::now() >= deadline {
            bail!("the CRI plugin does not list {image} and {PAUSE_IMAGE} after importing them");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((cri, image))
}

/// A CRI error: the gRPC status of a failed call, or a call that did not answer in time.
#[derive(Debug)]
pub struct CallError {
    pub call: &'static str,
    /// None when the call timed out.
    pub code: Option<tonic::Code>,
    pub message: String,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(code) => write!(f, "CRI {}: {code:?}: {}", self.call, self.message),
            None => write!(f, "CRI {}: {}", self.call, self.message),
        }
    }
}

impl std::error::Error for CallError {}

pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl Cri {
    /// Connects to the CRI services on containerd's socket (the plugin shares it).
    pub fn connect(socket: &Path) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
        let path = socket.to_path_buf();
        let connector = tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        });
        // The URI is required by tonic and ignored by the connector.
        let endpoint = Endpoint::from_static("http://[::]:50051").connect_timeout(Duration::from_secs(10));
        let channel = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(30), endpoint.connect_with_connector(connector)).await
            })
            .map_err(|_| anyhow!("connecting to {}: timed out", socket.display()))?
            .with_context(|| format!("connecting to {}", socket.display()))?;
        Ok(Self { rt, runtime: RuntimeServiceClient::new(channel.clone()), images: ImageServiceClient::new(channel) })
    }

    fn call<T>(
        &self,
        call: &'static str,
        timeout: Duration,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, CallError> {
        // The timer must be made inside the runtime.
        match self.rt.block_on(async { tokio::time::timeout(timeout, fut).await }) {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(CallError { call, code: Some(s.code()), message: s.message().to_string() }),
            Err(_) => Err(CallError { call, code: None, message: format!("no answer within {timeout:?}") }),
        }
    }

    pub fn version(&self) -> Result<api::VersionResponse, CallError> {
        let mut c = self.runtime.clone();
        self.call("Version", CALL_TIMEOUT, c.version(api::VersionRequest { version: "v1".into() }))
    }

    /// The runtime's readiness conditions (RuntimeReady, NetworkReady) as name -> (status, message).
    pub fn conditions(&self) -> Result<HashMap<String, (bool, String)>, CallError> {
        let mut c = self.runtime.clone();
        let r = self.call("Status", CALL_TIMEOUT, c.status(api::StatusRequest { verbose: false }))?;
        Ok(r.status
            .map(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .map(|c| (c.r#type, (c.status, c.message)))
            .collect())
    }

    /// Whether the image is known to the CRI plugin.
    pub fn image_present(&self, image: &str) -> Result<bool, CallError> {
        let mut c = self.images.clone();
        let req = api::ImageStatusRequest { image: Some(image_spec(image)), verbose: false };
        Ok(self.call("ImageStatus", CALL_TIMEOUT, c.image_status(req))?.image.is_some())
    }

    /// RunPodSandbox; returns the sandbox id.
    pub fn run_pod(&self, config: &api::PodSandboxConfig, runtime_handler: &str) -> Result<String, CallError> {
        let mut c = self.runtime.clone();
        let req = api::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: runtime_handler.into() };
        Ok(self.call("RunPodSandbox", POD_TIMEOUT, c.run_pod_sandbox(req))?.pod_sandbox_id)
    }

    /// PodSandboxStatus with the runtime's verbose info (containerd: "info" is JSON with the sandbox task's pid).
    pub fn pod_status(&self, id: &str) -> Result<(api::PodSandboxStatus, HashMap<String, String>), CallError> {
        let mut c = self.runtime.clone();
        let req = api::PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose: true };
        let r = self.call("PodSandboxStatus", CALL_TIMEOUT, c.pod_sandbox_status(req))?;
        let status = r.status.ok_or_else(|| CallError {
            call: "PodSandboxStatus",
            code: None,
            message: "no status in the answer".into(),
        })?;
        Ok((status, r.info))
    }

    pub fn list_pods(&self) -> Result<Vec<api::PodSandbox>, CallError> {
        let mut c = self.runtime.clone();
        Ok(self
            .call("ListPodSandbox", CALL_TIMEOUT, c.list_pod_sandbox(api::ListPodSandboxRequest { filter: None }))?
            .items)
    }

    pub fn stop_pod(&self, id: &str) -> Result<(), CallError> {
        let mut c = self.runtime.clone();
        self.call(
            "StopPodSandbox",
            POD_TIMEOUT,
            c.stop_pod_sandbox(api::StopPodSandboxRequest { pod_sandbox_id: id.into() }),
        )?;
        Ok(())
    }

    pub fn remove_pod(&self, id: &str) -> Result<(), CallError> {
        let mut c = self.runtime.clone();
        self.call(
            "RemovePodSandbox",
            POD_TIMEOUT,
            c.remove_pod_sandbox(api::RemovePodSandboxRequest { pod_sandbox_id: id.into() }),
        )?;
        Ok(())
    }

    /// CreateContainer in a pod (`pod` is the config the pod was run with, as the kubelet sends it).
    pub fn create_container(
        &self,
        pod_id: &str,
        config: &api::ContainerConfig,
        pod: &api::PodSandboxConfig,
    ) -> Result<String, CallError> {
        let mut c = self.runtime.clone();
        let req = api::CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config.clone()),
            sandbox_config: Some(pod.clone()),
        };
        Ok(self.call("CreateContainer", POD_TIMEOUT, c.create_container(req))?.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), CallError> {
        let mut c = self.runtime.clone();
        self.call(
            "StartContainer",
            POD_TIMEOUT,
            c.start_container(api::StartContainerRequest { container_id: id.into() }),
        )?;
        Ok(())
    }

    /// StopContainer: SIGTERM, then SIGKILL after `grace_secs`.
    pub fn stop_container(&self, id: &str, grace_secs: i64) -> Result<(), CallError> {
        let mut c = self.runtime.clone();
        let req = api::StopContainerRequest { container_id: id.into(), timeout: grace_secs };
        self.call("StopContainer", POD_TIMEOUT, c.stop_container(req))?;
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<(), CallError> {
        let mut c = self.runtime.clone();
        self.call(
            "RemoveContainer",
            POD_TIMEOUT,
            c.remove_container(api::RemoveContainerRequest { container_id: id.into() }),
        )?;
        Ok(())
    }

    pub fn container_status(&self, id: &str) -> Result<api::ContainerStatus, CallError> {
        let mut c = self.runtime.clone();
        let req = api::ContainerStatusRequest { container_id: id.into(), verbose: false };
        self.call("ContainerStatus", CALL_TIMEOUT, c.container_status(req))?.status.ok_or_else(|| CallError {
            call: "ContainerStatus",
            code: None,
            message: "no status in the answer".into(),
        })
    }

    /// Polls ContainerStatus until the container is in `state`.
    pub fn wait_container_state(
        &self,
        id: &str,
        state: api::ContainerState,
        timeout: Duration,
    ) -> anyhow::Result<api::ContainerStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.container_status(id)?;
            if s.state == state as i32 {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "container {id} is {:?}, not {state:?}, after {timeout:?}",
                    api::ContainerState::try_from(s.state)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// ExecSync; `timeout_secs` 0 means none (the containerd side).
    pub fn exec_sync(&self, id: &str, cmd: &[&str], timeout_secs: i64) -> Result<ExecResult, CallError> {
        let mut c = self.runtime.clone();
        let req = api::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_secs,
        };
        let deadline =
            if timeout_secs > 0 { Duration::from_secs(timeout_secs as u64) + CALL_TIMEOUT } else { POD_TIMEOUT };
        let r = self.call("ExecSync", deadline, c.exec_sync(req))?;
        Ok(ExecResult {
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
            exit_code: r.exit_code,
        })
    }

    /// ExecSync that must exit 0; returns its stdout.
    pub fn exec_ok(&self, id: &str, cmd: &[&str]) -> anyhow::Result<String> {
        let r = self.exec_sync(id, cmd, 0)?;
        if r.exit_code != 0 {
            bail!("exec {cmd:?} in {id}: exit {}; stdout {:?}, stderr {:?}", r.exit_code, r.stdout, r.stderr);
        }
        Ok(r.stdout)
    }

    pub fn container_stats(&self, id: &str) -> Result<api::ContainerStats, CallError> {
        let mut c = self.runtime.clone();
        self.call(
            "ContainerStats",
            CALL_TIMEOUT,
            c.container_stats(api::ContainerStatsRequest { container_id: id.into() }),
        )?
        .stats
        .ok_or_else(|| CallError {
            call: "ContainerStats",
            code: None,
            message: "no stats in the answer".into(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct ExecResult {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

fn image_spec(image: &str) -> api::ImageSpec {
    api::ImageSpec { image: image.into(), ..Default::default() }
}

/// A pod config as the kubelet would send it: metadata, a log directory, a pod network
/// namespace (CNI) unless changed, the PID namespace per container, a shared IPC one.
pub struct PodConfig(pub api::PodSandboxConfig);

impl PodConfig {
    /// `name` must be unique among the live pods of a test (it also makes the uid).
    pub fn new(name: &str, log_dir: &Path) -> Self {
        let namespaces = api::NamespaceOption {
            network: api::NamespaceMode::Pod as i32,
            pid: api::NamespaceMode::Container as i32,
            ipc: api::NamespaceMode::Pod as i32,
            ..Default::default()
        };
        Self(api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: name.into(),
                uid: format!("{name}-{}", std::process::id()),
                namespace: POD_NAMESPACE.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: log_dir.display().to_string(),
            linux: Some(api::LinuxPodSandboxConfig {
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn namespaces(&mut self) -> &mut api::NamespaceOption {
        let linux = self.0.linux.get_or_insert_with(Default::default);
        let sc = linux.security_context.get_or_insert_with(Default::default);
        sc.namespace_options.get_or_insert_with(Default::default)
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.0.annotations.insert(key.into(), value.into());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.0.labels.insert(key.into(), value.into());
        self
    }

    /// The pod's network namespace: `Pod` (CNI sets it up) or `Node` (host network:
    /// no CNI, and no hostname may be set).
    pub fn network(mut self, mode: api::NamespaceMode) -> Self {
        self.namespaces().network = mode as i32;
        if mode == api::NamespaceMode::Node {
            self.0.hostname.clear();
        }
        self
    }

    pub fn pid(mut self, mode: api::NamespaceMode) -> Self {
        self.namespaces().pid = mode as i32;
        self
    }

    pub fn cgroup_parent(mut self, parent: &str) -> Self {
        self.0.linux.get_or_insert_with(Default::default).cgroup_parent = parent.into();
        self
    }

    /// Any other change to the config.
    pub fn edit(mut self, f: impl FnOnce(&mut api::PodSandboxConfig)) -> Self {
        f(&mut self.0);
        self
    }

    pub fn build(self) -> api::PodSandboxConfig {
        self.0
    }
}

/// A container config: metadata, image, command, and its log file `<name>.log` in the
/// pod's log directory.
pub struct ContainerConfig(pub api::ContainerConfig);

impl ContainerConfig {
    pub fn new(name: &str, image: &str, command: &[&str]) -> Self {
        Self(api::ContainerConfig {
            metadata: Some(api::ContainerMetadata { name: name.into(), attempt: 0 }),
            image: Some(image_spec(image)),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            ..Default::default()
        })
    }

    /// A bind mount of a host path (a hostPath or emptyDir volume, as the kubelet sends it).
    pub fn mount(mut self, host_path: &Path, container_path: &str, readonly: bool) -> Self {
        self.0.mounts.push(api::Mount {
            host_path: host_path.display().to_string(),
            container_path: container_path.into(),
            readonly,
            ..Default::default()
        });
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.0.envs.push(api::KeyValue { key: key.into(), value: value.into() });
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.0.annotations.insert(key.into(), value.into());
        self
    }

    /// Any other change to the config.
    pub fn edit(mut self, f: impl FnOnce(&mut api::ContainerConfig)) -> Self {
        f(&mut self.0);
        self
    }

    pub fn build(self) -> api::ContainerConfig {
        self.0
    }
}

/// Where the CRI plugin writes a container's log: the pod's log directory joined with
/// the container's log path.
pub fn log_file(pod: &api::PodSandboxConfig, container: &api::ContainerConfig) -> PathBuf {
    Path::new(&pod.log_directory).join(&container.log_path)
}

/// One entry of a CRI container log: `<RFC 3339 time> <stream> <P|F> <text>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub time: String,
    pub stream: String,
    /// `P`: the line continues in the next entry of the stream; `F`: it ends here.
    pub partial: bool,
    pub text: String,
}

/// Parses a CRI container log; any line not in the format is an error.
pub fn parse_log(text: &str) -> anyhow::Result<Vec<LogEntry>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = || anyhow!("CRI log line {} is not `<time> <stream> <P|F> <text>`: {line:?}", i + 1);
        let mut parts = line.splitn(4, ' ');
        let time = parts.next().ok_or_else(bad)?;
        let stream = parts.next().ok_or_else(bad)?;
        let tag = parts.next().ok_or_else(bad)?;
        let text = parts.next().unwrap_or("");
        let looks_like_time = time.len() >= 20 && time.as_bytes()[4] == b'-' && time.as_bytes()[10] == b'T';
        if !looks_like_time || !matches!(stream, "stdout" | "stderr") || !matches!(tag, "P" | "F") {
            return Err(bad());
        }
        out.push(LogEntry { time: time.into(), stream: stream.into(), partial: tag == "P", text: text.into() });
    }
    Ok(out)
}

/// The complete lines of one stream (partial entries joined).
pub fn stream_lines(entries: &[LogEntry], stream: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for e in entries.iter().filter(|e| e.stream == stream) {
        cur.push_str(&e.text);
        if !e.partial {
            lines.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// A CNI network config with only the `loopback` plugin: the pod gets a network
/// namespace with `lo` up and nothing else (no CNI network yet).
pub fn loopback_cni_conflist() -> String {
    r#"{"cniVersion": "0.4.0", "name": "wisp-loopback", "plugins": [{"type": "loopback"}]}"#.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cri_logs_and_joins_partial_lines() {
        let log = "2024-01-02T03:04:05.123456789Z stdout F hello world\n\
                   2024-01-02T03:04:05.2Z stderr P par\n\
                   2024-01-02T03:04:05.3Z stdout F \n\
                   2024-01-02T03:04:05.4Z stderr F tial\n";
        let e = parse_log(log).unwrap();
        assert_eq!(e.len(), 4);
        assert_eq!(e[0].text, "hello world");
        assert!(e[1].partial && !e[0].partial);
        assert_eq!(stream_lines(&e, "stdout"), ["hello world", ""]);
        assert_eq!(stream_lines(&e, "stderr"), ["partial"]);
        assert!(parse_log("hello\n").is_err());
        assert!(parse_log("2024-01-02T03:04:05.1Z stdin F x\n").is_err());
        assert!(parse_log("2024-01-02T03:04:05.1Z stdout X x\n").is_err());
    }

    #[test]
    fn pod_config_builder() {
        let p =
            PodConfig::new("p1", Path::new("/tmp/logs")).annotation("a", "b").network(api::NamespaceMode::Node).build();
        assert_eq!(p.annotations["a"], "b");
        assert!(p.hostname.is_empty(), "a host-network pod must not set a hostname");
        let ns = p.linux.unwrap().security_context.unwrap().namespace_options.unwrap();
        assert_eq!(ns.network, api::NamespaceMode::Node as i32);
        let c = ContainerConfig::new("c1", "img", &["true"]).mount(Path::new("/h"), "/c", true).build();
        assert_eq!(c.log_path, "c1.log");
        assert_eq!((c.mounts[0].host_path.as_str(), c.mounts[0].readonly), ("/h", true));
        let cfg: serde_json::Value = serde_json::from_str(&loopback_cni_conflist()).unwrap();
        assert_eq!(cfg["plugins"][0]["type"], "loopback");
    }
}
