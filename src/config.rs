//! Typed engine configuration: defaults, a builder, and `KVT_*` environment overrides.
//!
//! | field | env | default |
//! |---|---|---|
//! | `listen` | `KVT_LISTEN` | `127.0.0.1:0` (port 0 = pick one) |
//! | `transport` | `KVT_TRANSPORT` | `auto` (`auto`, `tcp`, `rdma`) |
//! | `connections_per_peer` | `KVT_CONNECTIONS` | 2 |
//! | `slice_size` | `KVT_SLICE_SIZE` | 1 MiB (accepts `K`/`M`/`G` suffixes) |
//! | `min_stripe_bytes` | `KVT_MIN_STRIPE` | 256 KiB |
//! | `inline_bytes` | `KVT_INLINE_BYTES` | 64 KiB |
//! | `batch_timeout` | `KVT_BATCH_TIMEOUT_MS` | 30 000 ms |
//! | `connect_timeout` | `KVT_CONNECT_TIMEOUT_MS` | 5 000 ms |
//! | `busy_poll` | `KVT_BUSY_POLL_US` | 100 µs |
//! | `devices` | `KVT_DEVICES` | the KV rails: active ports of NICs that share a PCIe switch with a GPU, or all where none does (`mlx5_0,mlx5_3` or `dev:port`) |
//! | `gid_index` | `KVT_GID_INDEX` | the RoCEv2 IPv4-mapped GID of the port's netdev |
//! | `qps_per_rail` | `KVT_QPS_PER_RAIL` | 2 |
//! | `io_threads` | `KVT_IO_THREADS` | 2 (TCP I/O threads, and as many send threads) |
//! | `gpu_mode` | `KVT_GPU_MODE` | `auto` (`auto`, `dmabuf`, `peermem`, `staging`) |
//! | `rails_per_gpu` | `KVT_RAILS_PER_GPU` | 1 (nearest rails a GPU segment uses) |
//! | `secret` | `KVT_SECRET`, or `KVT_SECRET_FILE` (a path) | none: peers are not authenticated |
//! | `metrics_listen` | `KVT_METRICS_LISTEN` | none: no HTTP endpoint (`ip:port` serves `GET /metrics`) |
//!
//! Logging is not engine configuration: [`init_logging`](crate::init_logging) (C
//! `kvt_init_logging`, Python `kvtransfer.init_logging`) installs a subscriber, with the filter
//! from `RUST_LOG`, else its argument, else (C and Python) `KVT_LOG`, else `warn`.
//!
//! Environment overrides apply only when asked for ([`EngineConfigBuilder::env_overrides`] or
//! [`EngineConfig::from_env`]), so a program that builds its config in code is not surprised.

use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// Which transport carries data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// RDMA when a usable device exists on both ends, else TCP.
    #[default]
    Auto,
    /// TCP sockets only.
    Tcp,
    /// RDMA verbs only (fails where no device is usable).
    Rdma,
}

impl TransportKind {
    /// Lower-case name (`auto`, `tcp`, `rdma`).
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Auto => "auto",
            TransportKind::Tcp => "tcp",
            TransportKind::Rdma => "rdma",
        }
    }
}

impl FromStr for TransportKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(TransportKind::Auto),
            "tcp" => Ok(TransportKind::Tcp),
            "rdma" => Ok(TransportKind::Rdma),
            other => Err(invalid(
                "transport",
                format!("{other:?} is not auto, tcp or rdma"),
            )),
        }
    }
}

/// How GPU device memory is registered (host memory is unaffected by this choice).
///
/// `Auto` tries, per segment, dmabuf, then peermem, then host staging, logging why each
/// preferred mode failed; a forced mode that fails makes the registration fail. On TCP, device
/// segments always go through staging whatever the choice (there is no NIC to give them to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuMode {
    /// dmabuf → peermem → staging, the first that works.
    #[default]
    Auto,
    /// `cuMemGetHandleForAddressRange` + `ibv_reg_dmabuf_mr` only.
    Dmabuf,
    /// `ibv_reg_mr` on the device pointer only (needs the nvidia-peermem kernel module).
    Peermem,
    /// No GPUDirect: copies through pinned host bounce buffers.
    Staging,
}

impl GpuMode {
    /// Lower-case name (`auto`, `dmabuf`, `peermem`, `staging`).
    pub fn as_str(self) -> &'static str {
        match self {
            GpuMode::Auto => "auto",
            GpuMode::Dmabuf => "dmabuf",
            GpuMode::Peermem => "peermem",
            GpuMode::Staging => "staging",
        }
    }
}

impl FromStr for GpuMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(GpuMode::Auto),
            "dmabuf" => Ok(GpuMode::Dmabuf),
            "peermem" => Ok(GpuMode::Peermem),
            "staging" => Ok(GpuMode::Staging),
            other => Err(invalid(
                "gpu_mode",
                format!("{other:?} is not auto, dmabuf, peermem or staging"),
            )),
        }
    }
}

/// Configuration of one [`TransferEngine`](crate::TransferEngine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Address the bootstrap listener binds (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Transport choice.
    pub transport: TransportKind,
    /// TCP data connections (or RDMA QPs per rail) opened to each peer.
    pub connections_per_peer: usize,
    /// Largest slice a request is split into, in bytes.
    pub slice_size: u64,
    /// Batches of at most this many bytes go on one connection instead of being striped.
    pub min_stripe_bytes: u64,
    /// Batches of at most this many bytes are written by the submitting thread itself
    /// (no hand-off to a sender thread), which saves a thread wake-up per batch.
    pub inline_bytes: u64,
    /// Default deadline of a batch, from submission.
    pub batch_timeout: Duration,
    /// Deadline for connecting to a peer and completing the handshake.
    pub connect_timeout: Duration,
    /// How long progress threads keep polling a quiet connection before they sleep.
    pub busy_poll: Duration,
    /// RDMA devices allowed as rails (`mlx5_0`, or `mlx5_0:1` for one port); `None` = the KV
    /// rails ([`topology::kv_rails`](crate::topology::kv_rails)).
    pub devices: Option<Vec<String>>,
    /// GID index to use on every rail; `None` = choose the RoCEv2 IPv4-mapped one.
    pub gid_index: Option<u16>,
    /// RC queue pairs per (peer, rail) pair.
    pub qps_per_rail: usize,
    /// Threads that read every TCP connection (an epoll set), and as many that write for
    /// them: an engine's TCP threads do not grow with its peers.
    pub io_threads: usize,
    /// How GPU memory is registered (see [`GpuMode`]).
    pub gpu_mode: GpuMode,
    /// How many of the nearest rails a GPU segment is registered on and striped over
    /// ([`topology::rails_for`](crate::topology::rails_for)).
    pub rails_per_gpu: usize,
    /// The cluster secret every engine of the deployment holds (at least 16 bytes). With one,
    /// each connection starts with a mutual challenge–response proof of it, before anything
    /// about either engine is revealed; a peer without it is refused
    /// ([`Error::Unauthenticated`]). See `docs/security.md`.
    pub secret: Option<crate::wire::Secret>,
    /// Where to serve the engine's metrics over HTTP for Prometheus (`GET /metrics`, the
    /// text of [`metrics_text`](crate::TransferEngine::metrics_text)); `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            transport: TransportKind::Auto,
            connections_per_peer: 2,
            slice_size: 1 << 20,
            min_stripe_bytes: 256 << 10,
            inline_bytes: 64 << 10,
            batch_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            busy_poll: Duration::from_micros(100),
            devices: None,
            gid_index: None,
            qps_per_rail: 2,
            io_threads: 2,
            gpu_mode: GpuMode::Auto,
            rails_per_gpu: 1,
            secret: None,
            metrics_listen: None,
        }
    }
}

impl EngineConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> EngineConfigBuilder {
        EngineConfigBuilder {
            config: EngineConfig::default(),
            error: None,
        }
    }

    /// The defaults with `KVT_*` environment overrides applied.
    pub fn from_env() -> Result<Self> {
        Self::builder().env_overrides().build()
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        if !(1..=64).contains(&self.connections_per_peer) {
            return Err(invalid("connections_per_peer", "must be 1..=64"));
        }
        if self.slice_size < 4096 || self.slice_size > crate::wire::MAX_FRAME_PAYLOAD {
            return Err(invalid("slice_size", "must be between 4 KiB and 1 GiB"));
        }
        if !(1..=16).contains(&self.qps_per_rail) {
            return Err(invalid("qps_per_rail", "must be 1..=16"));
        }
        if !(1..=64).contains(&self.io_threads) {
            return Err(invalid("io_threads", "must be 1..=64"));
        }
        if !(1..=16).contains(&self.rails_per_gpu) {
            return Err(invalid("rails_per_gpu", "must be 1..=16"));
        }
        if self.batch_timeout.is_zero() {
            return Err(invalid("batch_timeout", "must be > 0"));
        }
        if self.connect_timeout.is_zero() {
            return Err(invalid("connect_timeout", "must be > 0"));
        }
        Ok(())
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Builds an [`EngineConfig`]; errors are reported by [`build`](Self::build).
#[derive(Debug)]
pub struct EngineConfigBuilder {
    config: EngineConfig,
    error: Option<Error>,
}

impl EngineConfigBuilder {
    /// Bootstrap listen address, as `ip:port` or `host:port`.
    pub fn listen(mut self, addr: impl AsRef<str>) -> Self {
        match resolve(addr.as_ref()) {
            Ok(a) => self.config.listen = a,
            Err(e) => self.error = self.error.or(Some(e)),
        }
        self
    }
    /// Transport choice.
    pub fn transport(mut self, t: TransportKind) -> Self {
        self.config.transport = t;
        self
    }
    /// Connections per peer.
    pub fn connections_per_peer(mut self, n: usize) -> Self {
        self.config.connections_per_peer = n;
        self
    }
    /// Largest slice in bytes.
    pub fn slice_size(mut self, bytes: u64) -> Self {
        self.config.slice_size = bytes;
        self
    }
    /// Striping threshold in bytes.
    pub fn min_stripe_bytes(mut self, bytes: u64) -> Self {
        self.config.min_stripe_bytes = bytes;
        self
    }
    /// Inline-submission threshold in bytes.
    pub fn inline_bytes(mut self, bytes: u64) -> Self {
        self.config.inline_bytes = bytes;
        self
    }
    /// Default batch deadline.
    pub fn batch_timeout(mut self, d: Duration) -> Self {
        self.config.batch_timeout = d;
        self
    }
    /// Connect + handshake deadline.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.config.connect_timeout = d;
        self
    }
    /// Busy-poll window of progress threads.
    pub fn busy_poll(mut self, d: Duration) -> Self {
        self.config.busy_poll = d;
        self
    }
    /// RDMA device allow-list.
    pub fn devices<S: Into<String>>(mut self, devices: impl IntoIterator<Item = S>) -> Self {
        self.config.devices = Some(devices.into_iter().map(Into::into).collect());
        self
    }
    /// GID index for every rail.
    pub fn gid_index(mut self, index: u16) -> Self {
        self.config.gid_index = Some(index);
        self
    }
    /// QPs per (peer, rail) pair.
    pub fn qps_per_rail(mut self, n: usize) -> Self {
        self.config.qps_per_rail = n;
        self
    }

    /// TCP I/O threads (and as many send threads); see [`EngineConfig::io_threads`].
    pub fn io_threads(mut self, n: usize) -> Self {
        self.config.io_threads = n;
        self
    }
    /// How GPU memory is registered.
    pub fn gpu_mode(mut self, mode: GpuMode) -> Self {
        self.config.gpu_mode = mode;
        self
    }

    /// Nearest rails per GPU segment.
    pub fn rails_per_gpu(mut self, n: usize) -> Self {
        self.config.rails_per_gpu = n;
        self
    }

    /// Serves the metrics over HTTP at `addr` (see [`EngineConfig::metrics_listen`]).
    pub fn metrics_listen(mut self, addr: SocketAddr) -> Self {
        self.config.metrics_listen = Some(addr);
        self
    }

    /// The cluster secret (at least 16 bytes).
    pub fn secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        match crate::wire::Secret::new(secret) {
            Ok(s) => self.config.secret = Some(s),
            Err(e) => self.error = self.error.or(Some(invalid("secret", e))),
        }
        self
    }
    /// The cluster secret, read from a file (a trailing newline is not part of it).
    pub fn secret_file(mut self, path: impl AsRef<std::path::Path>) -> Self {
        match read_secret_file(path.as_ref()) {
            Ok(s) => self.config.secret = Some(s),
            Err(e) => self.error = self.error.or(Some(e)),
        }
        self
    }

    /// Applies every `KVT_*` variable that is set (see the module docs).
    pub fn env_overrides(self) -> Self {
        self.overrides_from(|k| std::env::var(k).ok())
    }

    /// Applies overrides from any key → value source (the environment, in production).
    pub fn overrides_from(mut self, get: impl Fn(&str) -> Option<String>) -> Self {
        let mut r = || -> Result<()> {
            let c = &mut self.config;
            if let Some(v) = get("KVT_LISTEN") {
                c.listen = resolve(&v)?;
            }
            if let Some(v) = get("KVT_TRANSPORT") {
                c.transport = v.parse()?;
            }
            if let Some(v) = get("KVT_CONNECTIONS") {
                c.connections_per_peer = parse_num("KVT_CONNECTIONS", &v)? as usize;
            }
            if let Some(v) = get("KVT_SLICE_SIZE") {
                c.slice_size = parse_size("KVT_SLICE_SIZE", &v)?;
            }
            if let Some(v) = get("KVT_MIN_STRIPE") {
                c.min_stripe_bytes = parse_size("KVT_MIN_STRIPE", &v)?;
            }
            if let Some(v) = get("KVT_INLINE_BYTES") {
                c.inline_bytes = parse_size("KVT_INLINE_BYTES", &v)?;
            }
            if let Some(v) = get("KVT_BATCH_TIMEOUT_MS") {
                c.batch_timeout = Duration::from_millis(parse_num("KVT_BATCH_TIMEOUT_MS", &v)?);
            }
            if let Some(v) = get("KVT_CONNECT_TIMEOUT_MS") {
                c.connect_timeout = Duration::from_millis(parse_num("KVT_CONNECT_TIMEOUT_MS", &v)?);
            }
            if let Some(v) = get("KVT_BUSY_POLL_US") {
                c.busy_poll = Duration::from_micros(parse_num("KVT_BUSY_POLL_US", &v)?);
            }
            if let Some(v) = get("KVT_METRICS_LISTEN").filter(|v| !v.is_empty()) {
                c.metrics_listen = Some(resolve(&v)?);
            }
            if let Some(v) = get("KVT_DEVICES") {
                let list: Vec<String> = v
                    .split(',')
                    .map(|d| d.trim().to_string())
                    .filter(|d| !d.is_empty())
                    .collect();
                c.devices = (!list.is_empty()).then_some(list);
            }
            if let Some(v) = get("KVT_GID_INDEX") {
                c.gid_index = Some(
                    parse_num("KVT_GID_INDEX", &v)?
                        .try_into()
                        .map_err(|_| invalid("KVT_GID_INDEX", "too large"))?,
                );
            }
            if let Some(v) = get("KVT_QPS_PER_RAIL") {
                c.qps_per_rail = parse_num("KVT_QPS_PER_RAIL", &v)? as usize;
            }
            if let Some(v) = get("KVT_IO_THREADS") {
                c.io_threads = parse_num("KVT_IO_THREADS", &v)? as usize;
            }
            if let Some(v) = get("KVT_GPU_MODE") {
                c.gpu_mode = v.parse()?;
            }
            if let Some(v) = get("KVT_RAILS_PER_GPU") {
                c.rails_per_gpu = parse_num("KVT_RAILS_PER_GPU", &v)? as usize;
            }
            if let Some(v) = get("KVT_SECRET_FILE").filter(|v| !v.is_empty()) {
                c.secret = Some(read_secret_file(std::path::Path::new(&v))?);
            }
            if let Some(v) = get("KVT_SECRET").filter(|v| !v.is_empty()) {
                c.secret = Some(
                    crate::wire::Secret::new(v.as_bytes()).map_err(|e| invalid("KVT_SECRET", e))?,
                );
            }
            Ok(())
        };
        if let Err(e) = r() {
            self.error = self.error.or(Some(e));
        }
        self
    }

    /// Validates and returns the config.
    pub fn build(self) -> Result<EngineConfig> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.config.validate()?;
        Ok(self.config)
    }
}

fn read_secret_file(path: &std::path::Path) -> Result<crate::wire::Secret> {
    let bytes = std::fs::read(path)
        .map_err(|e| invalid("secret_file", format!("{}: {e}", path.display())))?;
    crate::wire::Secret::from_file_contents(&bytes)
        .map_err(|e| invalid("secret_file", format!("{}: {e}", path.display())))
}

fn resolve(s: &str) -> Result<SocketAddr> {
    s.to_socket_addrs()
        .map_err(|e| invalid("listen", format!("{s:?}: {e}")))?
        .next()
        .ok_or_else(|| invalid("listen", format!("{s:?} resolves to nothing")))
}

pub(crate) fn parse_num(field: &str, s: &str) -> Result<u64> {
    s.trim()
        .parse::<u64>()
        .map_err(|e| invalid(field, format!("{s:?}: {e}")))
}

/// Parses a byte size: a number with an optional `K`, `M` or `G` suffix (powers of 1024).
pub fn parse_size(field: &str, s: &str) -> Result<u64> {
    let t = s
        .trim()
        .trim_end_matches(['b', 'B'])
        .trim_end_matches(['i']);
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| invalid(field, format!("{s:?} is not a size like 4096, 64K or 1M")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn defaults_are_valid() {
        EngineConfig::default().validate().unwrap();
        assert_eq!(
            EngineConfig::builder().build().unwrap(),
            EngineConfig::default()
        );
    }

    #[test]
    fn env_overrides_apply() {
        let env: HashMap<&str, &str> = [
            ("KVT_LISTEN", "127.0.0.1:5555"),
            ("KVT_TRANSPORT", "TCP"),
            ("KVT_CONNECTIONS", "4"),
            ("KVT_SLICE_SIZE", "256K"),
            ("KVT_BATCH_TIMEOUT_MS", "1500"),
            ("KVT_BUSY_POLL_US", "0"),
            ("KVT_METRICS_LISTEN", "127.0.0.1:9464"),
            ("KVT_DEVICES", "mlx5_0, mlx5_3:1"),
            ("KVT_GID_INDEX", "3"),
            ("KVT_QPS_PER_RAIL", "4"),
            ("KVT_IO_THREADS", "3"),
            ("KVT_GPU_MODE", "Staging"),
            ("KVT_RAILS_PER_GPU", "2"),
        ]
        .into();
        let c = EngineConfig::builder()
            .connections_per_peer(1)
            .overrides_from(|k| env.get(k).map(|v| v.to_string()))
            .build()
            .unwrap();
        assert_eq!(c.listen.port(), 5555);
        assert_eq!(c.transport, TransportKind::Tcp);
        assert_eq!(c.connections_per_peer, 4);
        assert_eq!(c.slice_size, 256 << 10);
        assert_eq!(c.batch_timeout, Duration::from_millis(1500));
        assert_eq!(c.busy_poll, Duration::ZERO);
        assert_eq!(
            c.metrics_listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
        assert_eq!(
            c.devices,
            Some(vec!["mlx5_0".to_string(), "mlx5_3:1".to_string()])
        );
        assert_eq!(c.gid_index, Some(3));
        assert_eq!(c.qps_per_rail, 4);
        assert_eq!(c.io_threads, 3);
        assert_eq!(c.gpu_mode, GpuMode::Staging);
        assert_eq!(c.rails_per_gpu, 2);
        let e = EngineConfig::builder().rails_per_gpu(0).build();
        assert!(
            matches!(e, Err(Error::InvalidConfig { ref field, .. }) if field == "rails_per_gpu")
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let e = EngineConfig::builder()
            .overrides_from(|k| (k == "KVT_TRANSPORT").then(|| "ib".into()))
            .build();
        assert!(matches!(e, Err(Error::InvalidConfig { ref field, .. }) if field == "transport"));
        let e = EngineConfig::builder()
            .overrides_from(|k| (k == "KVT_GPU_MODE").then(|| "gdr".into()))
            .build();
        assert!(matches!(e, Err(Error::InvalidConfig { ref field, .. }) if field == "gpu_mode"));
        for m in [
            GpuMode::Auto,
            GpuMode::Dmabuf,
            GpuMode::Peermem,
            GpuMode::Staging,
        ] {
            assert_eq!(m.as_str().parse::<GpuMode>().unwrap(), m);
        }
        let e = EngineConfig::builder()
            .overrides_from(|k| (k == "KVT_SLICE_SIZE").then(|| "lots".into()))
            .build();
        assert!(
            matches!(e, Err(Error::InvalidConfig { ref field, .. }) if field == "KVT_SLICE_SIZE")
        );
        assert!(
            EngineConfig::builder()
                .connections_per_peer(0)
                .build()
                .is_err()
        );
        assert!(EngineConfig::builder().slice_size(100).build().is_err());
        assert!(
            EngineConfig::builder()
                .listen("not an address")
                .build()
                .is_err()
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("x", "4096").unwrap(), 4096);
        assert_eq!(parse_size("x", "64K").unwrap(), 65536);
        assert_eq!(parse_size("x", "64KiB").unwrap(), 65536);
        assert_eq!(parse_size("x", "1m").unwrap(), 1 << 20);
        assert_eq!(parse_size("x", "2G").unwrap(), 2 << 30);
        assert!(parse_size("x", "").is_err());
        assert!(parse_size("x", "99999999999999G").is_err());
    }
}
