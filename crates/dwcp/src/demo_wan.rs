//! The WAN half of `dwcp demo`: two agents on a netlab WAN (each in its
//! own network namespace, talking AMST with mutual TLS), a VM booted on
//! one, its checkpoint replicated to the other, then live-migrated there
//! with the progress display, its TICK lines going on; moved back; and the
//! same guest moved by QEMU's own migration (multifd + zstd) over the same
//! link for comparison.
//!
//! The agents and every command run inside the lab's namespaces as the
//! user would run them (`dwcp agent`, `dwcp vm ...`), so what is shown is
//! the CLI's own output.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dwcp_api::format_bytes;
use dwcp_netlab::{Lab, LabConfig};
use serde_json::Value;

use crate::demo::{ticks, Steps};

/// The WAN and the guest of the demo.
pub struct WanArgs {
    pub rate: String,
    pub delay: String,
    pub loss: String,
    pub workload_mb: u64,
    pub accel: String,
}

struct Wan<'a> {
    lab: Lab,
    exe: PathBuf,
    dir: &'a Path,
    agents: Vec<Child>,
}

impl Wan<'_> {
    /// `dwcp ARGS` on `host`, against that host's agent.
    fn cli(&self, host: &str, args: &[&str]) -> anyhow::Result<Command> {
        let mut c = self.lab.command(host, &self.exe.display().to_string())?;
        c.args(args).env("DWCP_API", "http://127.0.0.1:7480");
        Ok(c)
    }

    /// Runs `dwcp ARGS` on `host`; its output, or an error with its stderr.
    fn run(&self, host: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(host, args)?.output()?;
        if !out.status.success() {
            bail!(
                "dwcp {} on {host}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn console(&self, host: &str, vm: &str) -> String {
        self.run(host, &["vm", "console", vm]).unwrap_or_default()
    }

    fn link_bytes(&self) -> u64 {
        self.lab.stats().iter().map(|l| l.arrived_bytes).sum()
    }

    /// Waits until VM `vm` on `host` printed `n` TICK lines more than
    /// `after`; prints the new ones.
    fn wait_ticks(&self, host: &str, vm: &str, after: usize, n: usize) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let text = self.console(host, vm);
            if text.contains("CORRUPT") {
                bail!("the guest's workload reported CORRUPT memory");
            }
            let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TICK ")).collect();
            if lines.len() >= after + n {
                for l in &lines[after..after + n] {
                    println!("    | {host}: {}", l.trim_end());
                }
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!("VM {vm} on {host} printed no TICK line for 120 s");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Wan<'_> {
    fn drop(&mut self) {
        // The guest's QEMU outlives its agent (by design): end it first,
        // wherever it is.
        for host in ["a", "b"] {
            let _ = self.run(host, &["vm", "delete", "wan", "--force"]);
        }
        for agent in &mut self.agents {
            // SAFETY: plain kill(2) on a child we started. SIGTERM: the
            // agent exits.
            unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = agent.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

/// What a migration cost on the link.
struct Moved {
    what: String,
    secs: f64,
    link_bytes: u64,
    pause_ms: Option<u64>,
}

pub fn run(args: &WanArgs, dir: &Path, steps: &mut Steps) -> anyhow::Result<()> {
    steps.begin(&format!(
        "building a WAN with netlab: hosts a and b, {} each way, {} delay, {} loss",
        args.rate, args.delay, args.loss
    ));
    let mut cfg = LabConfig::new(&format!("demo{}", std::process::id() % 10_000), &["a", "b"]);
    cfg.all = vec![
        ("rate".into(), args.rate.clone()),
        ("delay".into(), args.delay.clone()),
        ("loss".into(), args.loss.clone()),
    ];
    let lab = Lab::up(cfg).context("cannot build the netlab WAN (it needs root)")?;
    let (ip_a, ip_b) = (lab.addr("a")?, lab.addr("b")?);
    println!(
        "    a = {ip_a}, b = {ip_b} (network namespaces {} and {})",
        lab.config().netns("a"),
        lab.config().netns("b")
    );
    steps.done("WAN up");

    steps.begin("a cluster CA and certificates for nodes alpha and beta; an agent on each host");
    let ca = dir.join("ca");
    dwcp_transport::identity::init_ca(&ca, Duration::from_secs(86400))?;
    let mut wan = Wan {
        lab,
        exe: std::env::current_exe()?,
        dir,
        agents: Vec::new(),
    };
    for (node, host, me, peer) in [
        ("alpha", "a", ip_a, format!("beta={ip_b}:7481")),
        ("beta", "b", ip_b, format!("alpha={ip_a}:7481")),
    ] {
        let id = dir.join(node);
        dwcp_transport::identity::issue_node(&ca, node, &id, Duration::from_secs(86400))?;
        let data = dir.join(&node[..1]);
        let log = std::fs::File::create(dir.join(format!("{node}.log")))?;
        let agent = wan
            .lab
            .command(host, &wan.exe.display().to_string())?
            .args(["agent", "--api", "127.0.0.1:7480", "--accel", &args.accel])
            .arg("--data-dir")
            .arg(&data)
            .arg("--identity")
            .arg(&id)
            .args(["--amst-listen", &format!("{me}:7481"), "--peer", &peer])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start an agent")?;
        wan.agents.push(agent);
    }
    let t = Instant::now();
    loop {
        let up = wan
            .run("a", &["node", "list", "--json"])
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .is_some_and(|v| v.to_string().contains("\"up\""));
        if up {
            break;
        }
        if t.elapsed() > Duration::from_secs(40) {
            bail!(
                "the agents did not see each other within 40 s; alpha's log ends: {}",
                dwcp_hypervisor::qemu::log_tail(&dir.join("alpha.log"), 8)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    print!("{}", indent(&wan.run("a", &["node", "list"])?));
    steps.done("agents up");

    steps.begin("booting VM \"wan\" on alpha");
    let memory = format!("{}M", (args.workload_mb + 128).next_multiple_of(64));
    let guest = crate::demo::guest_dir()?;
    let append = format!(
        "console=ttyS0 quiet panic=-1 dwcp.mem_mb={} dwcp.dirty_pages=1000 dwcp.fill=text",
        args.workload_mb
    );
    let kernel = guest.join("vmlinuz").display().to_string();
    let initrd = guest.join("initrd.img").display().to_string();
    wan.run(
        "a",
        &[
            "vm", "create", "wan", "--memory", &memory, "--kernel", &kernel, "--initrd", &initrd,
            "--append", &append,
        ],
    )?;
    wan.wait_ticks("a", "wan", 0, 2)?;
    steps.done("boot on alpha");

    steps.begin("checkpoint on alpha, replicated to beta (only pages beta lacks travel)");
    print!(
        "{}",
        indent(&wan.run("a", &["vm", "checkpoint", "wan", "--replicate-to", "beta"])?)
    );
    println!("    letting the guest change its memory for 10 s ...");
    std::thread::sleep(Duration::from_secs(10));
    steps.done("replicate");

    let mut moved = Vec::new();
    for (from, to, what) in [
        ("a", "beta", "dwcp, alpha -> beta (replica at beta)"),
        ("b", "alpha", "dwcp, beta -> alpha (alpha's own checkpoint)"),
    ] {
        steps.begin(&format!("live migration: {what}"));
        let before_text = wan.console(from, "wan");
        let before = ticks(&before_text).last().copied().unwrap_or(0);
        let dest_host = if to == "beta" { "b" } else { "a" };
        let dest_before = ticks(&wan.console(dest_host, "wan")).len();
        let (bytes0, t0) = (wan.link_bytes(), Instant::now());
        let out = wan
            .cli(from, &["vm", "migrate", "wan", "--to", to])?
            .stderr(Stdio::inherit())
            .output()?;
        let secs = t0.elapsed().as_secs_f64();
        let summary = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("the migration failed");
        }
        print!("{}", indent(&summary));
        std::thread::sleep(Duration::from_secs(1));
        let link_bytes = wan.link_bytes() - bytes0;
        let text = wan.wait_ticks(dest_host, "wan", dest_before, 3)?;
        let after: Vec<u64> = ticks(&text);
        let first = after.get(dest_before).copied().unwrap_or(0);
        if first < before || first > before + 30 {
            bail!("after the move the guest counted from {first}, it was at {before}");
        }
        println!("    the guest went on counting at {to}: TICK {before} before, {first} first there, memory self-check OK");
        let pause_ms = summary
            .split("guest paused ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next()?.parse().ok());
        moved.push(Moved {
            what: what.into(),
            secs,
            link_bytes,
            pause_ms,
        });
        steps.done(&format!("migrate to {to}"));
    }

    steps.begin(
        "the same guest moved by QEMU's own migration (multifd, 4 channels, zstd), same link",
    );
    let q = qemu_multifd(&wan, &memory, &kernel, &initrd, &append)?;
    println!(
        "    {:.1} s, {} on the link",
        q.secs,
        format_bytes(q.link_bytes)
    );
    moved.push(q);
    steps.done("QEMU migration");

    println!(
        "\nOn {} / {} delay / {} loss, a {memory} guest with {} MiB of text (pause: dwcp's is the guest's at most, from its stop to the destination's answer; QEMU's is its own downtime figure):",
        args.rate, args.delay, args.loss, args.workload_mb
    );
    println!(
        "  {:<48} {:>8} {:>12} {:>14}",
        "", "time", "on the link", "pause"
    );
    let qemu = moved
        .last()
        .map(|m| (m.secs, m.link_bytes))
        .unwrap_or((1.0, 1));
    for m in &moved {
        println!(
            "  {:<48} {:>6.1} s {:>12} {:>14}   ({:.2}x time, {:.3}x bytes of QEMU's)",
            m.what,
            m.secs,
            format_bytes(m.link_bytes),
            m.pause_ms.map_or("-".into(), |p| format!("{p} ms")),
            m.secs / qemu.0,
            m.link_bytes as f64 / qemu.1.max(1) as f64,
        );
    }
    Ok(())
}

/// QEMU to QEMU, multifd with zstd, between the lab's hosts.
fn qemu_multifd(
    wan: &Wan,
    memory: &str,
    kernel: &str,
    initrd: &str,
    append: &str,
) -> anyhow::Result<Moved> {
    // Called inside `block_in_place`: the async QMP client runs on the
    // demo's runtime.
    let rt = tokio::runtime::Handle::current();
    let dir = wan.dir;
    let spawn = |host: &str, tag: &str, extra: &[&str]| -> anyhow::Result<Child> {
        let mut c = wan.lab.command(host, "qemu-system-x86_64")?;
        c.args([
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            memory,
            "-nodefaults",
        ])
        .args([
            "-no-user-config",
            "-display",
            "none",
            "-kernel",
            kernel,
            "-initrd",
            initrd,
        ])
        .args(["-append", append, "-serial"])
        .arg(format!(
            "file:{}",
            dir.join(format!("{tag}.console")).display()
        ))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join(format!("{tag}.qmp")).display()
        ))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        Ok(c.spawn()?)
    };
    let mut dst = spawn("b", "qemu-dst", &["-incoming", "defer"])?;
    let mut src = spawn("a", "qemu-src", &[])?;
    let result = rt.block_on(async {
        let connect = |tag: &str| {
            let p = dir.join(format!("{tag}.qmp"));
            async move {
                let t = Instant::now();
                loop {
                    match dwcp_hypervisor::Qmp::connect(&p, Duration::from_secs(5)).await {
                        Ok(q) => return Ok(q),
                        Err(e) if t.elapsed() > Duration::from_secs(20) => {
                            return Err(anyhow::anyhow!("QEMU's QMP: {e}"))
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            }
        };
        let (qs, qd) = (connect("qemu-src").await?, connect("qemu-dst").await?);
        for q in [&qs, &qd] {
            q.execute(
                "migrate-set-capabilities",
                Some(
                    serde_json::json!({"capabilities": [{"capability": "multifd", "state": true}]}),
                ),
            )
            .await?;
            q.execute(
                "migrate-set-parameters",
                Some(serde_json::json!({"multifd-channels": 4, "multifd-compression": "zstd"})),
            )
            .await?;
        }
        qd.execute(
            "migrate-incoming",
            Some(serde_json::json!({"uri": "tcp:0.0.0.0:4444"})),
        )
        .await?;
        let console = dir.join("qemu-src.console");
        let t = Instant::now();
        while ticks(&std::fs::read_to_string(&console).unwrap_or_default()).len() < 2 {
            if t.elapsed() > Duration::from_secs(120) {
                bail!("QEMU's guest printed no TICK line");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        qs.execute(
            "migrate-set-parameters",
            Some(serde_json::json!({"max-bandwidth": 64u64 << 30})),
        )
        .await?;
        let (bytes0, t0) = (wan.link_bytes(), Instant::now());
        let uri = format!("tcp:{}:4444", wan.lab.addr("b")?);
        qs.execute("migrate", Some(serde_json::json!({ "uri": uri })))
            .await?;
        let status = loop {
            let s = qs.execute("query-migrate", None).await?;
            match s["status"].as_str() {
                Some("completed") => break s,
                Some("failed") | Some("cancelled") => bail!("QEMU's migration {}", s["status"]),
                _ if t0.elapsed() > Duration::from_secs(600) => {
                    bail!("QEMU's migration did not finish in 600 s")
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let secs = t0.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(Moved {
            what: "QEMU multifd + zstd, a -> b".into(),
            secs,
            link_bytes: wan.link_bytes() - bytes0,
            pause_ms: status["downtime"].as_u64(),
        })
    });
    for c in [&mut src, &mut dst] {
        let _ = c.kill();
        let _ = c.wait();
    }
    result
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}
