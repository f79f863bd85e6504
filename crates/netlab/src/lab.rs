//! Labs: a set of hosts (network namespaces) wired through the emulator.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
#[cfg(test)]
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::emulator::{Emulator, LinkStats, Port, Settings};
use crate::params::{Direction, LinkOverride, LinkParams, ParamError};
use crate::sys::{self, SysError};
use crate::trace::{RateSchedule, TraceError};

/// Every namespace this tool makes starts with this.
pub const NETNS_PREFIX: &str = "nl-";
/// The TUN device's name inside each host.
pub const IFNAME: &str = "nl0";
const MAX_HOSTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error("lab {0:?} already exists (run `netlab down {0}` first)")]
    Exists(String),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("cannot read lab file {path}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lab file {path} is not valid")]
    Toml {
        path: String,
        #[source]
        source: toml::de::Error,
    },
}

/// What a lab is: its hosts and how each direction between them behaves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabConfig {
    pub name: String,
    pub hosts: Vec<String>,
    /// Settings of every direction, as `key=value` assignments on top of
    /// the defaults (see [`LinkParams::apply`]).
    pub all: Vec<(String, String)>,
    /// Per-link, per-direction settings on top of `all`.
    pub links: Vec<LinkOverride>,
    pub mtu: u32,
    pub seed: u64,
}

/// The TOML form of a lab file:
///
/// ```toml
/// hosts = ["h1", "h2"]
/// [all]
/// rate = "100mbit"
/// delay = "50ms"
/// [[link]]
/// from = "h1"
/// to = "h2"
/// rate = "20mbit"
/// ```
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabFile {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    all: BTreeMap<String, toml::Value>,
    #[serde(default)]
    link: Vec<BTreeMap<String, toml::Value>>,
}

fn toml_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

impl LabConfig {
    pub fn new(name: &str, hosts: &[&str]) -> LabConfig {
        LabConfig {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            all: Vec::new(),
            links: Vec::new(),
            mtu: 1500,
            seed: 1,
        }
    }

    /// Adds the settings of a TOML lab file.
    pub fn merge_file(&mut self, path: &Path) -> Result<(), LabError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| LabError::File {
            path: name.clone(),
            source,
        })?;
        let f: LabFile =
            toml::from_str(&text).map_err(|source| LabError::Toml { path: name, source })?;
        if self.hosts.is_empty() {
            self.hosts = f.hosts;
        }
        if let Some(m) = f.mtu {
            self.mtu = m;
        }
        if let Some(s) = f.seed {
            self.seed = s;
        }
        // File settings go first: flags given with it override them.
        let mut all: Vec<(String, String)> = f
            .all
            .iter()
            .map(|(k, v)| (k.clone(), toml_text(v)))
            .collect();
        all.append(&mut self.all);
        self.all = all;
        let mut links = Vec::new();
        for l in f.link {
            let get = |k: &str| l.get(k).map(toml_text);
            let (Some(a), Some(b)) = (get("from"), get("to")) else {
                return Err(LabError::Invalid(
                    "each [[link]] needs `from` and `to`".into(),
                ));
            };
            let both = get("both").is_some_and(|v| v == "true");
            let settings = l
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "from" | "to" | "both"))
                .map(|(k, v)| (k.clone(), toml_text(v)))
                .collect();
            links.push(LinkOverride {
                a,
                b,
                direction: if both { Direction::Both } else { Direction::Up },
                settings,
            });
        }
        links.append(&mut self.links);
        self.links = links;
        Ok(())
    }

    /// Checks names and every setting, loading traces: nothing is created
    /// for a config that fails here.
    pub fn validate(&self) -> Result<(), LabError> {
        let bad = |m: String| Err(LabError::Invalid(m));
        if !valid_name(&self.name, 12) {
            return bad(format!(
                "lab name {:?}: use 1-12 lower-case letters and digits",
                self.name
            ));
        }
        if self.hosts.len() < 2 || self.hosts.len() > MAX_HOSTS {
            return bad(format!(
                "a lab needs 2 to {MAX_HOSTS} hosts, got {}",
                self.hosts.len()
            ));
        }
        for (i, h) in self.hosts.iter().enumerate() {
            if !valid_name(h, 12) {
                return bad(format!(
                    "host name {h:?}: use 1-12 lower-case letters and digits"
                ));
            }
            if self.hosts[..i].contains(h) {
                return bad(format!("host {h:?} is named twice"));
            }
        }
        if !(576..=65535).contains(&self.mtu) {
            return bad(format!("mtu {} is out of range (576 to 65535)", self.mtu));
        }
        for o in &self.links {
            for h in [&o.a, &o.b] {
                if !self.hosts.contains(h) {
                    return bad(format!("link {}-{}: no host {h:?} in this lab", o.a, o.b));
                }
            }
            if o.a == o.b {
                return bad(format!(
                    "link {}-{}: a link joins two different hosts",
                    o.a, o.b
                ));
            }
        }
        for from in 0..self.hosts.len() {
            for to in 0..self.hosts.len() {
                if from != to {
                    self.settings(from, to)?;
                }
            }
        }
        Ok(())
    }

    /// The parameters of direction `from` → `to`.
    pub fn params(&self, from: usize, to: usize) -> Result<LinkParams, LabError> {
        let mut p = LinkParams::default();
        for (k, v) in &self.all {
            p.apply(k, v)?;
        }
        let (f, t) = (&self.hosts[from], &self.hosts[to]);
        for o in &self.links {
            let applies = match o.direction {
                Direction::Up => &o.a == f && &o.b == t,
                Direction::Down => &o.b == f && &o.a == t,
                Direction::Both => (&o.a == f && &o.b == t) || (&o.b == f && &o.a == t),
            };
            if applies {
                for (k, v) in &o.settings {
                    p.apply(k, v)?;
                }
            }
        }
        Ok(p)
    }

    fn settings(&self, from: usize, to: usize) -> Result<Settings, LabError> {
        let p = self.params(from, to)?;
        let trace = match &p.trace {
            Some(t) => Some(RateSchedule::load(&t.path, t.scale)?),
            None => None,
        };
        Ok((p, trace))
    }

    pub fn netns(&self, host: &str) -> String {
        format!("{NETNS_PREFIX}{}-{host}", self.name)
    }
}

/// A host of a running lab.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HostInfo {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
}

/// Address of the `i`-th host. Each lab's hosts live in their own
/// namespaces, so labs never see each other's addresses.
pub fn host_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, (i + 1) as u8)
}

/// A running lab. Dropping it stops the emulator and removes the hosts.
pub struct Lab {
    config: LabConfig,
    hosts: Vec<HostInfo>,
    emulator: Option<Emulator>,
}

impl Lab {
    /// Creates the namespaces and TUN devices and starts forwarding.
    pub fn up(config: LabConfig) -> Result<Lab, LabError> {
        config.validate()?;
        if config
            .hosts
            .iter()
            .any(|h| sys::netns_exists(&config.netns(h)))
        {
            return Err(LabError::Exists(config.name.clone()));
        }
        let mut lab = Lab {
            hosts: Vec::new(),
            emulator: None,
            config,
        };
        let mut ports = Vec::new();
        for (i, h) in lab.config.hosts.clone().iter().enumerate() {
            let ns = lab.config.netns(h);
            sys::ip(&["netns", "add", &ns])?;
            let addr = host_addr(i);
            lab.hosts.push(HostInfo {
                name: h.clone(),
                netns: ns.clone(),
                addr,
            });
            let tun = sys::in_netns(&ns, || {
                // Hosts speak IPv4 only; TCP gets room for large BDPs and
                // forgets path metrics between connections.
                let _ = sys::sysctl("net.ipv6.conf.all.disable_ipv6", "1");
                let _ = sys::sysctl("net.ipv6.conf.default.disable_ipv6", "1");
                let _ = sys::sysctl("net.ipv4.tcp_rmem", "4096 131072 134217728");
                let _ = sys::sysctl("net.ipv4.tcp_wmem", "4096 131072 134217728");
                let _ = sys::sysctl("net.ipv4.tcp_no_metrics_save", "1");
                sys::open_tun(IFNAME)
            })??;
            let mtu = lab.config.mtu.to_string();
            let cidr = format!("{addr}/24");
            sys::ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            sys::ip(&["-n", &ns, "addr", "add", &cidr, "dev", IFNAME])?;
            sys::ip(&[
                "-n",
                &ns,
                "link",
                "set",
                IFNAME,
                "mtu",
                &mtu,
                "txqueuelen",
                "10000",
                "up",
            ])?;
            ports.push(Port {
                name: h.clone(),
                addr,
                tun,
            });
        }
        let cfg = lab.config.clone();
        let mut failed = None;
        let emulator = Emulator::start(ports, cfg.seed, |from, to| {
            cfg.settings(from, to).unwrap_or_else(|e| {
                failed = Some(e);
                (LinkParams::default(), None)
            })
        });
        if let Some(e) = failed {
            return Err(e);
        }
        lab.emulator = Some(emulator);
        Ok(lab)
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &LabConfig {
        &self.config
    }

    pub fn hosts(&self) -> &[HostInfo] {
        &self.hosts
    }

    fn index(&self, host: &str) -> Result<usize, LabError> {
        self.hosts
            .iter()
            .position(|h| h.name == host)
            .ok_or_else(|| {
                LabError::Invalid(format!("lab {} has no host {host:?}", self.config.name))
            })
    }

    pub fn addr(&self, host: &str) -> Result<Ipv4Addr, LabError> {
        Ok(self.hosts[self.index(host)?].addr)
    }

    /// A command that runs `program` inside `host`.
    pub fn command(&self, host: &str, program: &str) -> Result<Command, LabError> {
        let ns = &self.hosts[self.index(host)?].netns;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        Ok(c)
    }

    /// Replaces the lab's settings: `all` for every direction, then
    /// `links` on top. Checked as a whole before anything changes.
    pub fn set(
        &mut self,
        all: Vec<(String, String)>,
        links: Vec<LinkOverride>,
        replace_all: bool,
    ) -> Result<(), LabError> {
        let mut next = self.config.clone();
        if replace_all {
            next.all = all;
            next.links = links;
        } else {
            next.all.extend(all);
            next.links.extend(links);
        }
        next.validate()?;
        if let Some(em) = &self.emulator {
            for from in 0..next.hosts.len() {
                for to in 0..next.hosts.len() {
                    if from != to {
                        em.set(from, to, next.settings(from, to)?);
                    }
                }
            }
        }
        self.config = next;
        Ok(())
    }

    /// Traces play from their start from now on (to give runs compared
    /// with each other the same stretch of a trace).
    pub fn restart_traces(&self) {
        if let Some(em) = &self.emulator {
            em.restart_traces();
        }
    }

    pub fn stats(&self) -> Vec<LinkStats> {
        self.emulator
            .as_ref()
            .map(Emulator::stats)
            .unwrap_or_default()
    }

    pub fn unroutable(&self) -> u64 {
        self.emulator
            .as_ref()
            .map(Emulator::unroutable)
            .unwrap_or(0)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.emulator.take();
        for h in &self.hosts {
            let _ = sys::ip(&["netns", "del", &h.netns]);
        }
    }
}

/// Removes the namespaces of lab `name` (or of every lab), whatever state
/// they were left in. Returns the namespaces removed.
pub fn remove_namespaces(name: Option<&str>) -> Vec<String> {
    let prefix = match name {
        Some(n) => format!("{NETNS_PREFIX}{n}-"),
        None => NETNS_PREFIX.to_owned(),
    };
    let mut removed = Vec::new();
    for ns in sys::netns_list() {
        if ns.starts_with(&prefix) && sys::ip(&["netns", "del", &ns]).is_ok() {
            removed.push(ns);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_file_then_flags_then_links() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("lab.toml");
        std::fs::write(
            &f,
            "hosts = [\"h1\", \"h2\"]\nseed = 7\n[all]\nrate = \"200mbit\"\ndelay = \"50ms\"\n\
             [[link]]\nfrom = \"h2\"\nto = \"h1\"\nrate = \"20mbit\"\n",
        )
        .expect("write");
        let mut cfg = LabConfig::new("lab", &[]);
        cfg.all = vec![("delay".into(), "10ms".into())]; // a flag beats the file
        cfg.merge_file(&f).expect("merge");
        cfg.validate().expect("valid");
        assert_eq!(cfg.hosts, vec!["h1", "h2"]);
        assert_eq!(cfg.seed, 7);
        let up = cfg.params(0, 1).expect("h1->h2");
        let down = cfg.params(1, 0).expect("h2->h1");
        assert_eq!(
            (up.rate_bps, up.delay),
            (Some(200_000_000), Duration::from_millis(10))
        );
        assert_eq!(
            down.rate_bps,
            Some(20_000_000),
            "the [[link]] applies h2->h1 only"
        );

        std::fs::write(&f, "hosts = [\"a\", \"b\"]\n[all]\nrate = \"fast\"\n").expect("write");
        let mut bad = LabConfig::new("lab", &[]);
        bad.merge_file(&f).expect("parses");
        assert!(
            bad.validate().is_err(),
            "bad values in a file are refused before anything is made"
        );
        std::fs::write(&f, "hostz = [\"a\"]\n").expect("write");
        assert!(matches!(
            LabConfig::new("lab", &[]).merge_file(&f),
            Err(LabError::Toml { .. })
        ));
    }
}
