//! `dwcp cluster ...` (identity) and `dwcp transfer ...` (AMST file transfers).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use dwcp_transport::identity::{init_ca, issue_node};
use dwcp_transport::net::hex;
use dwcp_transport::{
    Chunk, Class, Listener, NodeIdentity, Progress, Session, Streams, TransportConfig,
};
use tokio::io::AsyncWriteExt;

#[derive(Args)]
pub struct ClusterCommand {
    #[command(subcommand)]
    action: ClusterAction,
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Create a cluster CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// How long the CA is valid (e.g. 3650d).
        #[arg(long, default_value = "3650d", value_parser = parse_validity)]
        valid_for: Duration,
    },
    /// Issue a node key and certificate signed by the cluster CA.
    Issue {
        /// The cluster CA's directory.
        #[arg(long)]
        dir: PathBuf,
        /// The node's name (goes into the certificate).
        #[arg(long)]
        node: String,
        /// Where node.pem, node.key and ca.pem are written.
        #[arg(long)]
        out: PathBuf,
        /// How long the certificate is valid (e.g. 365d, 12h, 30s).
        #[arg(long, default_value = "365d", value_parser = parse_validity)]
        valid_for: Duration,
    },
}

fn parse_validity(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 365d, 12h, 30m or 10s"))?;
    let secs = match unit {
        "d" => n * 86400,
        "h" => n * 3600,
        "m" => n * 60,
        "s" => n,
        _ => return Err(format!("{s:?}: unit must be d, h, m or s")),
    };
    if secs == 0 || secs > 100 * 365 * 86400 {
        return Err(format!("{s:?}: out of range (1s to 100 years)"));
    }
    Ok(Duration::from_secs(secs))
}

pub fn cluster(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd.action {
        ClusterAction::Init { dir, valid_for } => {
            init_ca(&dir, valid_for)?;
            println!(
                "created cluster CA in {} (ca.pem, ca.key; keep ca.key secret)",
                dir.display()
            );
        }
        ClusterAction::Issue {
            dir,
            node,
            out,
            valid_for,
        } => {
            issue_node(&dir, &node, &out, valid_for)?;
            println!(
                "issued certificate for node {node} in {} (node.pem, node.key, ca.pem), valid for {}",
                out.display(),
                human_duration(valid_for)
            );
        }
    }
    Ok(())
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 86400 && s.is_multiple_of(86400) {
        format!("{} days", s / 86400)
    } else if s >= 3600 {
        format!("{:.1} hours", s as f64 / 3600.0)
    } else {
        format!("{s} s")
    }
}

#[derive(Args)]
pub struct TransferCommand {
    #[command(subcommand)]
    action: TransferAction,
}

#[derive(Subcommand)]
enum TransferAction {
    /// Receive one transfer into a file.
    Recv {
        /// Address to listen on, e.g. 0.0.0.0:7481.
        #[arg(long)]
        listen: SocketAddr,
        /// This node's TLS directory (node.pem, node.key, ca.pem).
        #[arg(long)]
        tls: PathBuf,
        /// Where to write what arrives (written to PATH.part, renamed when verified).
        #[arg(long)]
        out: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a file to a receiver.
    Send {
        path: PathBuf,
        /// The receiver's address.
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        tls: PathBuf,
        /// The receiver's node name, checked against its certificate
        /// (without it, any node of the cluster is accepted).
        #[arg(long)]
        peer: Option<String>,
        /// Number of TCP connections, or auto.
        #[arg(long, default_value = "auto")]
        streams: Streams,
        /// Most unacknowledged MiB (the receiver's reorder limit).
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=4096))]
        window_mib: u64,
        #[arg(long, default_value = "replication")]
        class: Class,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn rate(bps: f64) -> String {
    if bps >= 1e9 {
        format!("{:.2} Gbit/s", bps / 1e9)
    } else {
        format!("{:.1} Mbit/s", bps / 1e6)
    }
}

struct Ticker {
    tty: bool,
    last: Instant,
}

impl Ticker {
    fn show(&mut self, line: &str, force: bool) {
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(2)
        };
        if !force && self.last.elapsed() < every {
            return;
        }
        self.last = Instant::now();
        let mut e = std::io::stderr();
        if self.tty {
            let _ = write!(e, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(e, "{line}");
        }
        let _ = e.flush();
    }
    fn end(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

pub async fn transfer(cmd: TransferCommand) -> anyhow::Result<()> {
    match cmd.action {
        TransferAction::Recv {
            listen,
            tls,
            out,
            json,
        } => {
            let id = NodeIdentity::load(&tls)?;
            let listener = Listener::bind(listen, &id, TransportConfig::default()).await?;
            eprintln!("node {} listening on {}", id.name(), listener.local_addr());
            let mut inc = listener.accept().await.context("the listener stopped")?;
            eprintln!(
                "receiving {:?} from {} ({} class)",
                inc.name,
                inc.peer,
                inc.class.as_str()
            );
            let part = out.with_extension("part");
            let mut file = tokio::fs::File::create(&part)
                .await
                .with_context(|| format!("cannot create {}", part.display()))?;
            let t0 = Instant::now();
            let mut hasher = blake3::Hasher::new();
            let mut got = 0u64;
            let mut ticker = Ticker {
                tty: std::io::stderr().is_terminal(),
                last: Instant::now(),
            };
            let (bytes, hash) = loop {
                match inc.chunks.recv().await {
                    Some(Chunk::Data(d)) => {
                        hasher.update(&d);
                        got += d.len() as u64;
                        file.write_all(&d)
                            .await
                            .with_context(|| format!("cannot write {}", part.display()))?;
                        let secs = t0.elapsed().as_secs_f64().max(1e-3);
                        ticker.show(
                            &format!(
                                "received {:.1} MB, {}",
                                got as f64 / 1e6,
                                rate(got as f64 * 8.0 / secs)
                            ),
                            false,
                        );
                    }
                    Some(Chunk::Done { bytes, hash }) => break (bytes, hash),
                    None => {
                        ticker.end();
                        let _ = tokio::fs::remove_file(&part).await;
                        bail!("the transfer was abandoned after {got} bytes (sender gone)");
                    }
                }
            };
            ticker.end();
            file.sync_all().await.context("cannot sync the output")?;
            drop(file);
            if *hasher.finalize().as_bytes() != hash || bytes != got {
                let _ = tokio::fs::remove_file(&part).await;
                bail!("received data does not match its hash; nothing written");
            }
            tokio::fs::rename(&part, &out)
                .await
                .with_context(|| format!("cannot rename to {}", out.display()))?;
            let secs = t0.elapsed().as_secs_f64();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"bytes": bytes, "seconds": secs, "goodput_bps": bytes as f64 * 8.0 / secs,
                        "hash": hex(&hash), "peer": inc.peer, "name": inc.name})
                );
            } else {
                println!(
                    "received {bytes} bytes in {secs:.2} s ({}) from {}, blake3 {} verified, written to {}",
                    rate(bytes as f64 * 8.0 / secs),
                    inc.peer,
                    hex(&hash),
                    out.display()
                );
            }
            // Let the Done frame reach the sender before the process ends:
            // the sender closes once it has it.
            listener.wait_closed(Duration::from_secs(10)).await;
            Ok(())
        }
        TransferAction::Send {
            path,
            to,
            tls,
            peer,
            streams,
            window_mib,
            class,
            json,
        } => {
            let id = NodeIdentity::load(&tls)?;
            let file = tokio::fs::File::open(&path)
                .await
                .with_context(|| format!("cannot open {}", path.display()))?;
            let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
            let cfg = TransportConfig {
                streams,
                window_bytes: window_mib << 20,
                ..TransportConfig::default()
            };
            let session = Session::connect(to, &id, peer.as_deref(), cfg).await?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut ticker = Ticker {
                tty: std::io::stderr().is_terminal(),
                last: Instant::now(),
            };
            let report = session
                .send(
                    &name,
                    class,
                    size,
                    tokio::io::BufReader::with_capacity(1 << 20, file),
                    |p: &Progress| {
                        let secs = p.elapsed.as_secs_f64().max(1e-3);
                        let pct = if size > 0 {
                            100.0 * p.bytes_acked as f64 / size as f64
                        } else {
                            0.0
                        };
                        ticker.show(
                            &format!(
                                "{pct:5.1} %  {:.1}/{:.1} MB  {}  streams {}  retransmitted {}",
                                p.bytes_acked as f64 / 1e6,
                                size as f64 / 1e6,
                                rate(p.bytes_acked as f64 * 8.0 / secs),
                                p.streams,
                                p.retransmitted_frames
                            ),
                            false,
                        );
                    },
                )
                .await;
            ticker.end();
            let report = report?;
            session.close();
            let cpu = process_cpu_secs();
            if json {
                let mut v = serde_json::to_value(&report)?;
                v["cpu_secs"] = serde_json::json!(cpu);
                println!("{v}");
            } else {
                println!(
                    "sent {} bytes in {:.2} s: goodput {}, streams used {} (at the end {}), frames {} of which retransmitted {}, reconnects {}, CPU {:.2} s, blake3 {}",
                    report.bytes,
                    report.seconds,
                    rate(report.goodput_bps),
                    report.streams_max,
                    report.streams_final,
                    report.frames_sent,
                    report.retransmitted_frames,
                    report.reconnects,
                    cpu,
                    report.hash
                );
                for d in &report.stream_decisions {
                    println!(
                        "  at {:.1} s: streams {} -> {}: {}",
                        d.at_secs, d.from, d.to, d.reason
                    );
                }
            }
            Ok(())
        }
    }
}

/// CPU time (user + system) this process has used, in seconds.
fn process_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}
