//! `dwcp`: the node agent daemon and the command-line client.
//!
//! This crate only parses arguments, sets up logging and wires the library
//! crates together; the work is done in `dwcp-agent`, `dwcp-api` and
//! `dwcp-hypervisor`.

mod bench;
mod cli;
mod demo;
mod demo_wan;
mod transfer;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use dwcp_agent::{AccelChoice, AgentConfig};

#[derive(Parser)]
#[command(
    name = "dwcp",
    version,
    about = "A distributed hypervisor: one pool of VMs over many computers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent in the foreground.
    Agent(AgentArgs),
    /// Manage virtual machines on an agent.
    Vm(cli::VmCommand),
    /// List, show, delete and verify checkpoints (take them with
    /// `dwcp vm checkpoint`, restore with `dwcp vm restore`).
    Checkpoint(cli::CheckpointCommand),
    /// Show facts about an agent's node.
    Node(cli::NodeCommand),
    /// Cluster identity: the CA and node certificates.
    Cluster(transfer::ClusterCommand),
    /// Move files between nodes over AMST (mutual TLS, several streams).
    Transfer(transfer::TransferCommand),
    /// Start a temporary agent, boot the test guest, pause and resume it.
    Demo(demo::DemoArgs),
    /// Print the agent's OpenAPI document.
    Openapi,
    /// Benchmarks that measure a baseline side by side (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
}

#[derive(Args)]
struct AgentArgs {
    /// TOML config file (flags and environment override it).
    #[arg(long, env = "DWCP_CONFIG")]
    config: Option<PathBuf>,
    /// Where the store, VM files and sockets live [default: /var/lib/dwcp].
    #[arg(long, env = "DWCP_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address for the REST API [default: 127.0.0.1:7480].
    #[arg(long, env = "DWCP_LISTEN")]
    api: Option<SocketAddr>,
    /// This node's name [default: the host name].
    #[arg(long, env = "DWCP_NODE_NAME")]
    node_name: Option<String>,
    /// auto (KVM if it really boots a guest, else TCG), kvm or tcg.
    #[arg(long, env = "DWCP_ACCEL")]
    accel: Option<AccelChoice>,
    /// The QEMU system emulator [default: qemu-system-x86_64].
    #[arg(long, env = "DWCP_QEMU")]
    qemu: Option<PathBuf>,
    /// Directory with the test guest (vmlinuz, initrd.img), booted under KVM
    /// to prove that KVM works.
    #[arg(long, env = "DWCP_PROBE_GUEST_DIR")]
    probe_guest_dir: Option<PathBuf>,
    /// This node's certificate directory (from `dwcp cluster issue`);
    /// needed to talk to other nodes.
    #[arg(long, env = "DWCP_IDENTITY")]
    identity: Option<PathBuf>,
    /// Where other nodes reach this one over AMST [default: 0.0.0.0:7481].
    #[arg(long, env = "DWCP_AMST_LISTEN")]
    amst_listen: Option<SocketAddr>,
    /// Another node, NAME=ADDR:PORT of its AMST listener (repeatable; adds
    /// to the config file's [peers]).
    #[arg(long = "peer", value_parser = peer_arg)]
    peers: Vec<(String, SocketAddr)>,
}

fn peer_arg(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=ADDR:PORT"))?;
    let addr = addr
        .parse()
        .map_err(|_| format!("{addr:?}: expected an address like 10.0.0.2:7481"))?;
    Ok((name.to_string(), addr))
}

impl AgentArgs {
    /// flag > env (both via clap) > file > default.
    fn config(self) -> anyhow::Result<AgentConfig> {
        let mut cfg = match &self.config {
            Some(path) => AgentConfig::from_file(path)?,
            None => AgentConfig::default(),
        };
        if let Some(v) = self.data_dir {
            cfg.data_dir = v;
        }
        if let Some(v) = self.api {
            cfg.api = v;
        }
        if let Some(v) = self.node_name {
            cfg.node_name = Some(v);
        }
        if let Some(v) = self.accel {
            cfg.accel = v;
        }
        if let Some(v) = self.qemu {
            cfg.qemu_binary = v;
        }
        if let Some(v) = self.probe_guest_dir {
            cfg.probe_guest_dir = Some(v);
        }
        if let Some(v) = self.identity {
            cfg.identity = Some(v);
        }
        if let Some(v) = self.amst_listen {
            cfg.amst_listen = v;
        }
        cfg.peers.extend(self.peers);
        if cfg.data_dir.is_relative() {
            cfg.data_dir = std::env::current_dir()
                .context("cannot read the current directory")?
                .join(&cfg.data_dir);
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a terminal: a log file stays plain text.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed at once, not
/// when the future is first polled: the agent writes `api.addr` before it
/// polls its shutdown future, and a signal sent as soon as that file
/// appeared killed it uncleanly.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => {
            init_logging("info");
            let cfg = args.config()?;
            dwcp_agent::run(cfg, |_| {}, shutdown_signal()).await?;
            Ok(())
        }
        Command::Vm(cmd) => {
            init_logging("warn");
            cli::vm(cmd).await
        }
        Command::Node(cmd) => {
            init_logging("warn");
            cli::node(cmd).await
        }
        Command::Checkpoint(cmd) => {
            init_logging("warn");
            cli::checkpoint(cmd).await
        }
        Command::Cluster(cmd) => {
            init_logging("warn");
            transfer::cluster(cmd)
        }
        Command::Transfer(cmd) => {
            init_logging("info");
            transfer::transfer(cmd).await
        }
        Command::Demo(args) => {
            init_logging("warn");
            demo::run(args).await
        }
        Command::Bench(args) => {
            init_logging("warn");
            bench::run(args).await
        }
        Command::Openapi => {
            println!("{}", dwcp_agent::http::openapi_document());
            Ok(())
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Vm(_)
            | Command::Node(_)
            | Command::Checkpoint(_)
            | Command::Openapi
            | Command::Cluster(_)
    ) {
        // Commands that only print die quietly on a closed pipe
        // (`dwcp vm list | head`), as Unix tools do. Network commands keep
        // SIGPIPE ignored: a peer hanging up is an error to handle, not death.
        // SAFETY: restoring the default disposition of SIGPIPE.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("error: {}", cli::error_line(&e));
        std::process::exit(1);
    }
}
