//! `netlab`: bring WAN labs up and down, change their links, read counters.

mod bench;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use dwcp_netlab::control::{self, state_dir, LabState, Request};
use dwcp_netlab::lab::{remove_namespaces, LabConfig};
use dwcp_netlab::{LinkOverride, LinkStats};

#[derive(Parser)]
#[command(
    name = "netlab",
    version,
    about = "WAN emulator: hosts in network namespaces joined by emulated links"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a lab and start its emulator in the background.
    Up {
        lab: String,
        /// Host names, comma-separated (e.g. h1,h2,h3).
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        #[command(flatten)]
        link: LinkFlags,
        /// A TOML lab file (hosts, [all] settings, [[link]] overrides).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// Seed for loss and jitter draws.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Change a running lab's links (flags apply to every direction,
    /// --link on top).
    Set {
        lab: String,
        #[command(flatten)]
        link: LinkFlags,
        /// Start from no impairment instead of the current settings.
        #[arg(long)]
        reset: bool,
        /// Play traces from their start from now on (otherwise a trace
        /// runs on the lab's clock from `up`, looping).
        #[arg(long)]
        trace_restart: bool,
    },
    /// Print a host's address.
    Addr { lab: String, host: String },
    /// Run a command inside a host.
    Exec {
        lab: String,
        host: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Counters per link and direction.
    Stats {
        lab: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop a lab's emulator and remove its hosts (also after a crash).
    Down {
        lab: Option<String>,
        /// Every lab of this tool.
        #[arg(long, conflicts_with = "lab")]
        all: bool,
    },
    /// List running labs.
    List,
    /// Measure the emulator's accuracy against iperf3 (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    #[command(hide = true)]
    Daemon {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Args, Default)]
struct LinkFlags {
    /// Rate, e.g. 100mbit or 1gbit (token bucket).
    #[arg(long)]
    rate: Option<String>,
    /// One-way delay, e.g. 50ms.
    #[arg(long)]
    delay: Option<String>,
    /// Delay variation either way, e.g. 2ms (never reorders).
    #[arg(long)]
    jitter: Option<String>,
    /// Average loss, e.g. 1%.
    #[arg(long)]
    loss: Option<String>,
    /// Mean loss burst length in packets (Gilbert-Elliott); 1 = independent.
    #[arg(long)]
    burst: Option<String>,
    /// Queue limit, e.g. 256kb [default: 1.5 x BDP].
    #[arg(long)]
    queue: Option<String>,
    /// Replay a trace (mahimahi or `time_s Mbps` file) as the rate.
    #[arg(long)]
    trace: Option<String>,
    /// Multiply the trace's rates.
    #[arg(long)]
    trace_scale: Option<String>,
    /// Per-link override: HOST-HOST[:up|:down]:key=value,...
    /// (up is first→second host; without a direction, both).
    #[arg(long = "link")]
    links: Vec<LinkOverride>,
}

impl LinkFlags {
    fn settings(&self) -> Vec<(String, String)> {
        [
            ("rate", &self.rate),
            ("delay", &self.delay),
            ("jitter", &self.jitter),
            ("loss", &self.loss),
            ("burst", &self.burst),
            ("queue", &self.queue),
            ("trace", &self.trace),
            ("trace-scale", &self.trace_scale),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_owned(), v.clone())))
        .collect()
    }
}

fn need_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("netlab needs root (network namespaces and TUN devices)");
    }
    Ok(())
}

fn load_state(lab: &str) -> anyhow::Result<LabState> {
    match LabState::load(lab) {
        Some(s) => Ok(s),
        None => bail!("no lab named {lab:?} is up (see `netlab list`)"),
    }
}

fn print_stats(stats: &[LinkStats], unroutable: u64) {
    println!(
        "{:<12} {:>10} {:>12} {:>10} {:>9} {:>9} {:>7}  settings",
        "link", "delivered", "bytes", "lost", "q-drops", "loss%", "held"
    );
    for s in stats {
        let loss = if s.arrived_packets > 0 {
            100.0 * s.lost_packets as f64 / s.arrived_packets as f64
        } else {
            0.0
        };
        println!(
            "{:<12} {:>10} {:>12} {:>10} {:>9} {:>8.3}% {:>7}  {}",
            format!("{}->{}", s.from, s.to),
            s.delivered_packets,
            s.delivered_bytes,
            s.lost_packets,
            s.queue_drop_packets,
            loss,
            s.held_packets,
            s.settings
        );
    }
    if unroutable > 0 {
        println!("({unroutable} packets matched no host)");
    }
}

fn up(
    lab: String,
    hosts: Vec<String>,
    link: LinkFlags,
    config: Option<PathBuf>,
    mtu: u32,
    seed: u64,
) -> anyhow::Result<()> {
    let mut cfg = LabConfig::new(&lab, &[]);
    cfg.hosts = hosts;
    cfg.mtu = mtu;
    cfg.seed = seed;
    cfg.all = link.settings();
    cfg.links = link.links;
    if let Some(f) = &config {
        cfg.merge_file(f)?;
    }
    // Every setting (and trace file) is checked before anything is made.
    cfg.validate()?;
    need_root()?;
    if let Some(s) = LabState::load(&lab) {
        if s.daemon_alive() {
            bail!("lab {lab:?} is already up (run `netlab down {lab}` first)");
        }
    }
    let left = remove_namespaces(Some(&lab));
    if !left.is_empty() {
        eprintln!(
            "netlab: removed {} namespaces left by an earlier lab {lab}",
            left.len()
        );
    }
    let dir = state_dir(&lab);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&cfg)?)?;
    let log = std::fs::File::create(dir.join("daemon.log"))?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("daemon")
        .arg("--dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start the emulator daemon")?;
    let ready = control::wait_until(Duration::from_secs(30), || {
        dir.join("lab.json").exists() || matches!(child.try_wait(), Ok(Some(_)))
    });
    if !dir.join("lab.json").exists() {
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
        remove_namespaces(Some(&lab));
        let _ = std::fs::remove_dir_all(&dir);
        bail!(
            "lab {lab} did not come up{}: {}",
            if ready { "" } else { " within 30 s" },
            log.trim().lines().last().unwrap_or("(no output)")
        );
    }
    let state = load_state(&lab)?;
    println!("lab {lab} is up (emulator pid {})", state.pid);
    for h in &state.hosts {
        println!("  {:<12} {:<16} netns {}", h.name, h.addr, h.netns);
    }
    Ok(())
}

fn down(lab: Option<String>, all: bool) -> anyhow::Result<()> {
    need_root()?;
    let labs: Vec<String> = match (lab, all) {
        (Some(l), _) => vec![l],
        (None, true) => std::fs::read_dir(control::STATE_ROOT)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default(),
        (None, false) => bail!("name a lab, or give --all"),
    };
    let mut did = false;
    for lab in &labs {
        if let Some(s) = LabState::load(lab) {
            if s.daemon_alive() {
                if control::request(lab, &Request::Shutdown).is_err()
                    || !control::wait_until(Duration::from_secs(10), || !s.daemon_alive())
                {
                    // SAFETY: kill(2) on the daemon's pid, checked above.
                    unsafe { libc::kill(s.pid as i32, libc::SIGKILL) };
                }
                println!("lab {lab}: emulator stopped");
                did = true;
            }
        }
        let removed = remove_namespaces(Some(lab));
        if !removed.is_empty() {
            println!("lab {lab}: removed {}", removed.join(", "));
            did = true;
        }
        if std::fs::remove_dir_all(state_dir(lab)).is_ok() {
            did = true;
        }
    }
    if all {
        let removed = remove_namespaces(None);
        if !removed.is_empty() {
            println!("removed {}", removed.join(", "));
            did = true;
        }
    }
    if !did {
        match labs.first() {
            Some(l) if !all => bail!("no lab named {l:?} (nothing to remove)"),
            _ => println!("no labs"),
        }
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Up {
            lab,
            hosts,
            link,
            config,
            mtu,
            seed,
        } => up(lab, hosts, link, config, mtu, seed),
        Cmd::Set {
            lab,
            link,
            reset,
            trace_restart,
        } => {
            let req = Request::Set {
                all: link.settings(),
                links: link.links,
                reset,
                restart_traces: trace_restart,
            };
            let resp = control::request(&lab, &req).map_err(anyhow::Error::msg)?;
            for s in &resp.links {
                println!("{}->{}: {}", s.from, s.to, s.settings);
            }
            Ok(())
        }
        Cmd::Addr { lab, host } => {
            let s = load_state(&lab)?;
            let h = s
                .host(&host)
                .with_context(|| format!("lab {lab} has no host {host:?}"))?;
            println!("{}", h.addr);
            Ok(())
        }
        Cmd::Exec { lab, host, command } => {
            need_root()?;
            let s = load_state(&lab)?;
            let h = s
                .host(&host)
                .with_context(|| format!("lab {lab} has no host {host:?}"))?;
            let err = Command::new("ip")
                .args(["netns", "exec", &h.netns])
                .args(&command)
                .exec();
            bail!("cannot run {:?} in {host}: {err}", command[0])
        }
        Cmd::Stats { lab, json } => {
            let resp = control::request(&lab, &Request::Stats).map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&resp)?);
            } else {
                print_stats(&resp.links, resp.unroutable);
            }
            Ok(())
        }
        Cmd::Down { lab, all } => down(lab, all),
        Cmd::List => {
            let mut any = false;
            for e in std::fs::read_dir(control::STATE_ROOT)
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(s) = LabState::load(&name) {
                    let hosts: Vec<String> = s
                        .hosts
                        .iter()
                        .map(|h| format!("{}={}", h.name, h.addr))
                        .collect();
                    let alive = if s.daemon_alive() {
                        "up"
                    } else {
                        "DEAD (run netlab down)"
                    };
                    println!("{name}: {alive}, {}", hosts.join(" "));
                    any = true;
                }
            }
            if !any {
                println!("no labs");
            }
            Ok(())
        }
        Cmd::Bench(args) => bench::run(args),
        Cmd::Daemon { dir } => {
            let text = std::fs::read_to_string(dir.join("config.json"))
                .context("cannot read config.json")?;
            let cfg: LabConfig = serde_json::from_str(&text).context("bad config.json")?;
            control::run_daemon(cfg, &dir).map_err(anyhow::Error::msg)
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.command, Cmd::Daemon { .. } | Cmd::Bench(_)) {
        // Commands that only print die quietly on a closed pipe
        // (`netlab stats | head`); the daemon must survive a client that
        // hangs up.
        // SAFETY: restoring the default disposition of SIGPIPE.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(e) = run(cli) {
        eprintln!("netlab: error: {e:#}");
        std::process::exit(1);
    }
}
