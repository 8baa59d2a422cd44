//! What a shared directory is configured with: its tag, host path and options, checked
//! before any device is built. Trusts nothing: the values come from the command line or
//! from the shim, and every check names the offending value.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use fuse_backend_rs::passthrough::CachePolicy;

/// Longest tag the config space holds (virtio 1.2, 5.11.4: 36 bytes, NUL padded).
pub const TAG_MAX_LEN: usize = 36;
/// Most request queues a device offers. The guest uses at most one per vCPU, and all of
/// them are served by the one device thread, so more queues add no parallelism here.
pub const MAX_REQUEST_QUEUES: u16 = 16;

/// Default cap on the distinct inodes the passthrough holds for the guest at once (it
/// keeps an `O_PATH` descriptor per inode the guest has looked up and not forgotten;
/// a guest can look up without ever forgetting). 262144 is 2.5 times a container root
/// file system of 100,000 files walked end to end while the guest kept every inode
/// cached; the guest kernel forgets inodes it evicts, so ordinary workloads stay far
/// below. Not 1 << 20: with the handles below that needs more descriptors than the
/// usual hard limit (systemd's default for services is 524288), so the descriptor
/// limit, shared with everything else the VMM opens, would run out before the cap.
pub const DEFAULT_MAX_INODES: u32 = 1 << 18;
/// Default cap on the open files and directories (FUSE handles) the passthrough holds
/// for the guest at once: one host descriptor each, until RELEASE. 65536 is the open
/// file limit databases commonly ask of a whole host (Elasticsearch, Cassandra), far
/// above what a container's processes hold open together.
pub const DEFAULT_MAX_HANDLES: u32 = 1 << 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("virtio-fs tag is empty")]
    EmptyTag,
    #[error("virtio-fs tag '{0}' is longer than {TAG_MAX_LEN} bytes")]
    TagTooLong(String),
    #[error("virtio-fs tag '{0}' contains '{1}' (use letters, digits and punctuation other than ',' and '=')")]
    TagCharacter(String, char),
    #[error("virtio-fs share '{tag}': {path}: not a directory")]
    NotADirectory { tag: String, path: String },
    #[error("virtio-fs share '{tag}': {path}: {reason}")]
    Path { tag: String, path: String, reason: String },
    #[error("virtio-fs share '{tag}': {queues} request queues asked for; use 1 to {MAX_REQUEST_QUEUES}")]
    Queues { tag: String, queues: u16 },
    #[error("unknown virtio-fs cache mode '{0}' (use never, auto or always)")]
    CacheMode(String),
    #[error("virtio-fs share '{tag}': {what} is 0; the share would be unusable")]
    ZeroLimit { tag: String, what: &'static str },
}

/// How much the guest may cache of what it reads from the share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// No guest page cache for files (direct I/O) and no attribute or dentry caching:
    /// every change on the host is seen at once, at the cost of a request per access.
    /// Shared writable mmap of files does not work in the guest in this mode.
    Never,
    /// Close-to-open consistency: file data is cached while a file is open and dropped on
    /// the next open; attributes and directory entries are trusted for one second, and a
    /// size or mtime change seen on refresh drops cached data. Host-side changes show up
    /// within about a second, and at the latest on the next open.
    #[default]
    Auto,
    /// Data, attributes and entries are kept for a day: only for trees nobody changes on
    /// the host while the guest runs.
    Always,
}

impl CacheMode {
    /// How long the guest may trust attributes and directory entries.
    pub fn timeout(self) -> Duration {
        match self {
            CacheMode::Never => Duration::ZERO,
            CacheMode::Auto => Duration::from_secs(1),
            CacheMode::Always => Duration::from_secs(86_400),
        }
    }

    pub(super) fn policy(self) -> CachePolicy {
        match self {
            CacheMode::Never => CachePolicy::Never,
            CacheMode::Auto => CachePolicy::Auto,
            CacheMode::Always => CachePolicy::Always,
        }
    }
}

impl FromStr for CacheMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "never" => Ok(CacheMode::Never),
            "auto" => Ok(CacheMode::Auto),
            "always" => Ok(CacheMode::Always),
            other => Err(ConfigError::CacheMode(other.to_string())),
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheMode::Never => "never",
            CacheMode::Auto => "auto",
            CacheMode::Always => "always",
        })
    }
}

/// One host directory shared with the guest under one tag (one virtio-fs device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDirConfig {
    /// What the guest mounts: `mount -t virtiofs <tag> <dir>`.
    pub tag: String,
    /// The host directory; the guest reaches nothing outside it.
    pub path: PathBuf,
    /// Refuse every change with EROFS.
    pub read_only: bool,
    pub cache: CacheMode,
    /// Request queues offered (the guest uses at most one per vCPU); plus one hiprio queue.
    pub request_queues: u16,
    /// Pass extended attributes through (off: the guest gets ENOSYS and stops asking).
    pub xattr: bool,
    /// Most distinct inodes held for the guest at once; past it LOOKUP and the creating
    /// operations fail with ENFILE (`DEFAULT_MAX_INODES`).
    pub max_inodes: u32,
    /// Most open handles (OPEN, OPENDIR, CREATE) held at once; past it they fail with
    /// ENFILE (`DEFAULT_MAX_HANDLES`).
    pub max_handles: u32,
}

impl SharedDirConfig {
    /// A writable share with the defaults: cache `auto`, one request queue, no xattr,
    /// the default inode and handle caps.
    pub fn new(tag: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            tag: tag.into(),
            path: path.into(),
            read_only: false,
            cache: CacheMode::default(),
            request_queues: 1,
            xattr: false,
            max_inodes: DEFAULT_MAX_INODES,
            max_handles: DEFAULT_MAX_HANDLES,
        }
    }

    /// Checks the tag, the queue count, the caps and that the path is a directory.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_tag(&self.tag)?;
        if self.request_queues == 0 || self.request_queues > MAX_REQUEST_QUEUES {
            return Err(ConfigError::Queues { tag: self.tag.clone(), queues: self.request_queues });
        }
        for (what, value) in [("max-inodes", self.max_inodes), ("max-handles", self.max_handles)] {
            if value == 0 {
                return Err(ConfigError::ZeroLimit { tag: self.tag.clone(), what });
            }
        }
        let path = self.path.display().to_string();
        match std::fs::metadata(&self.path) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(ConfigError::NotADirectory { tag: self.tag.clone(), path }),
            Err(e) => Err(ConfigError::Path { tag: self.tag.clone(), path, reason: e.to_string() }),
        }
    }
}

/// A tag must fit the config space and survive the `TAG=PATH,...` command-line syntax:
/// 1 to 36 bytes, no `,` or `=`, no whitespace or control characters.
pub fn validate_tag(tag: &str) -> Result<(), ConfigError> {
    if tag.is_empty() {
        return Err(ConfigError::EmptyTag);
    }
    if tag.len() > TAG_MAX_LEN {
        return Err(ConfigError::TagTooLong(tag.to_string()));
    }
    if let Some(c) = tag.chars().find(|&c| c == ',' || c == '=' || c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::TagCharacter(tag.to_string(), c));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert_eq!(validate_tag("wisp-shared"), Ok(()));
        assert_eq!(validate_tag(&"x".repeat(TAG_MAX_LEN)), Ok(()));
        assert_eq!(validate_tag(""), Err(ConfigError::EmptyTag));
        assert!(matches!(validate_tag(&"x".repeat(TAG_MAX_LEN + 1)), Err(ConfigError::TagTooLong(_))));
        for bad in ["a,b", "a=b", "a b", "a\nb", "a\0b"] {
            assert!(matches!(validate_tag(bad), Err(ConfigError::TagCharacter(..))), "{bad:?}");
        }
    }

    #[test]
    fn cache_modes() {
        assert_eq!("never".parse::<CacheMode>(), Ok(CacheMode::Never));
        assert_eq!("auto".parse::<CacheMode>(), Ok(CacheMode::Auto));
        assert_eq!("always".parse::<CacheMode>(), Ok(CacheMode::Always));
        assert_eq!("metadata".parse::<CacheMode>(), Err(ConfigError::CacheMode("metadata".into())));
        assert_eq!(CacheMode::default(), CacheMode::Auto);
        assert_eq!(CacheMode::Never.timeout(), Duration::ZERO);
    }

    #[test]
    fn validation() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = SharedDirConfig::new("t", dir.path());
        assert_eq!(c.validate(), Ok(()));
        c.request_queues = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Queues { queues: 0, .. })));
        c.request_queues = MAX_REQUEST_QUEUES + 1;
        assert!(c.validate().is_err());
        c.request_queues = 1;
        c.max_handles = 0;
        assert!(matches!(c.validate(), Err(ConfigError::ZeroLimit { what: "max-handles", .. })));
        c.max_handles = 1;
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        c.path = file;
        assert!(matches!(c.validate(), Err(ConfigError::NotADirectory { .. })));
        c.path = dir.path().join("missing");
        assert!(matches!(c.validate(), Err(ConfigError::Path { .. })));
    }
}
