//! The agent's configuration: TOML file, environment and flags, in that
//! order of strength (flag > env > file > default; the binary merges them).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The port other nodes reach an agent's AMST listener on by default.
pub const DEFAULT_AMST_PORT: u16 = 7481;

/// Which accelerator VMs get.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM if a probe guest boots under it within `probe_timeout`, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            _ => Err(format!("{s:?}: expected auto, kvm or tcg")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Where the store, VM files and sockets live.
    pub data_dir: PathBuf,
    /// The REST API's listening address (loopback by default: it has no
    /// authentication yet).
    pub api: SocketAddr,
    /// The node's name (defaults to the host name).
    pub node_name: Option<String>,
    pub qemu_binary: PathBuf,
    pub accel: AccelChoice,
    /// A directory with `vmlinuz` and `initrd.img` of the test guest, booted
    /// under KVM to prove that KVM works.
    pub probe_guest_dir: Option<PathBuf>,
    #[serde(with = "secs")]
    pub probe_timeout: Duration,
    /// How long `stop` waits for the guest to power off before ending QEMU.
    #[serde(with = "secs")]
    pub stop_timeout: Duration,
    /// Bound on every QMP command.
    #[serde(with = "secs")]
    pub qmp_timeout: Duration,
    /// VMs may together be given at most this share of host memory.
    pub memory_overcommit: f64,
    /// Share of host memory that may hold replicas' memory in RAM, ready
    /// for a migration of their VMs to this node (0: none). Held memory
    /// is given up as soon as a VM here needs it.
    pub warm_memory_share: f64,
    /// zstd level for new pages in the page store (1 fastest, 19 smallest).
    pub checkpoint_zstd_level: i32,
    /// Bytes per second a checkpoint may read from QEMU (0: no limit), to
    /// spare the disk and CPU of other work.
    pub checkpoint_max_bandwidth: u64,
    /// This node's certificate directory (`dwcp cluster issue --out`).
    /// Without it the node talks to no other node.
    pub identity: Option<PathBuf>,
    /// Where other nodes reach this one over AMST.
    pub amst_listen: SocketAddr,
    /// Other nodes by name: where their AMST listens (`[peers]` table).
    pub peers: BTreeMap<String, SocketAddr>,
    /// How often each peer's link is measured (RTT and goodput).
    #[serde(with = "secs")]
    pub probe_interval: Duration,
    /// Bytes sent to measure a peer's goodput.
    pub probe_bytes: u64,
}

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        if !(0.0..=86_400.0).contains(&v) {
            return Err(serde::de::Error::custom(format!(
                "{v} s is out of range (0 to 86400)"
            )));
        }
        Ok(Duration::from_secs_f64(v))
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            data_dir: PathBuf::from("/var/lib/dwcp"),
            api: SocketAddr::from(([127, 0, 0, 1], dwcp_api::DEFAULT_API_PORT)),
            node_name: None,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            accel: AccelChoice::Auto,
            probe_guest_dir: None,
            probe_timeout: Duration::from_secs(20),
            stop_timeout: Duration::from_secs(30),
            qmp_timeout: Duration::from_secs(10),
            memory_overcommit: 1.0,
            warm_memory_share: 0.25,
            checkpoint_zstd_level: 3,
            checkpoint_max_bandwidth: 0,
            identity: None,
            amst_listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_AMST_PORT)),
            peers: BTreeMap::new(),
            probe_interval: Duration::from_secs(10),
            probe_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Unix socket paths are limited to 107 bytes; VM sockets live at
/// `<data_dir>/vms/<63-char name>/qmp.sock`.
const MAX_DATA_DIR_BYTES: usize = 107 - "/vms/".len() - 63 - "/qmp.sock".len();

impl AgentConfig {
    pub fn from_file(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir must not be empty".into());
        }
        let len = self.data_dir.as_os_str().len();
        if len > MAX_DATA_DIR_BYTES {
            return bad(format!(
                "data_dir {} is {len} bytes long; unix sockets under it need it to be at most {MAX_DATA_DIR_BYTES}",
                self.data_dir.display()
            ));
        }
        if let Some(n) = &self.node_name {
            if n.is_empty()
                || n.len() > 63
                || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return bad(format!("node_name {n:?}: use 1-63 letters, digits and '-'"));
            }
        }
        if self.probe_timeout.is_zero() || self.qmp_timeout.is_zero() {
            return bad("probe_timeout and qmp_timeout must be above zero".into());
        }
        if !(0.1..=8.0).contains(&self.memory_overcommit) {
            return bad(format!(
                "memory_overcommit {} is out of range (0.1 to 8)",
                self.memory_overcommit
            ));
        }
        if !(0.0..=0.9).contains(&self.warm_memory_share) {
            return bad(format!(
                "warm_memory_share {} is out of range (0 to 0.9)",
                self.warm_memory_share
            ));
        }
        for name in self.peers.keys() {
            if !dwcp_transport::identity::valid_node_name(name) {
                return bad(format!(
                    "peer name {name:?}: use 1-63 letters, digits and '-'"
                ));
            }
            if Some(name) == self.node_name.as_ref() {
                return bad(format!("peer {name:?} is this node's own name"));
            }
        }
        if !self.peers.is_empty() && self.identity.is_none() {
            return bad("peers need this node's certificate: set identity (--identity DIR from `dwcp cluster issue`)".into());
        }
        if self.probe_interval < Duration::from_secs(1)
            || self.probe_bytes == 0
            || self.probe_bytes > 1 << 30
        {
            return bad("probe_interval must be at least 1 s and probe_bytes 1 B to 1 GiB".into());
        }
        if !(1..=19).contains(&self.checkpoint_zstd_level) {
            return bad(format!(
                "checkpoint_zstd_level {} is out of range (1 to 19)",
                self.checkpoint_zstd_level
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_and_checks() {
        let c: AgentConfig = toml::from_str(
            "data_dir = \"/tmp/x\"\napi = \"127.0.0.1:9000\"\naccel = \"tcg\"\nstop_timeout = 2.5\n",
        )
        .expect("parses");
        assert_eq!(c.accel, AccelChoice::Tcg);
        assert_eq!(c.stop_timeout, Duration::from_millis(2500));
        assert!(c.validate().is_ok());
        assert!(
            toml::from_str::<AgentConfig>("acel = \"tcg\"").is_err(),
            "unknown keys are refused"
        );
        assert!(toml::from_str::<AgentConfig>("stop_timeout = -1").is_err());
        let long = AgentConfig {
            data_dir: PathBuf::from(format!("/{}", "d".repeat(60))),
            ..AgentConfig::default()
        };
        assert!(long.validate().is_err());
    }
}
