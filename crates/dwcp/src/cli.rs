//! The client commands: `dwcp vm ...` and `dwcp node ...`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use dwcp_api::{
    format_bytes, parse_bytes, CheckpointInfo, Client, ClientError, NodeInfo, StopRequest,
    VerifyResult, VmInfo, VmSpec,
};

#[derive(Args, Clone)]
pub struct Target {
    /// The agent's API URL.
    #[arg(
        long,
        global = true,
        env = "DWCP_API",
        default_value = "http://127.0.0.1:7480"
    )]
    pub api: String,
}

impl Target {
    fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::new(&self.api)?)
    }
}

#[derive(Args)]
pub struct VmCommand {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    action: VmAction,
}

#[derive(Subcommand)]
enum VmAction {
    /// Define a VM and (unless --no-start) boot it.
    Create {
        name: String,
        /// Memory, e.g. 256M or 1G.
        #[arg(long, value_parser = size)]
        memory: u64,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Linux kernel to boot.
        #[arg(long)]
        kernel: Option<String>,
        #[arg(long)]
        initrd: Option<String>,
        /// Kernel command line.
        #[arg(long)]
        append: Option<String>,
        /// qcow2 disk image.
        #[arg(long)]
        disk: Option<String>,
        /// A label KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = label)]
        labels: Vec<(String, String)>,
        /// Only define the VM; do not boot it.
        #[arg(long)]
        no_start: bool,
        #[arg(long)]
        json: bool,
    },
    /// List VMs.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one VM.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Boot a stopped or crashed VM.
    Start { name: String },
    /// Power a VM off: ACPI power button, then QEMU ends after the timeout.
    Stop {
        name: String,
        /// Seconds the guest gets to power off [default: the agent's, 30].
        #[arg(long)]
        timeout: Option<u64>,
        /// End QEMU at once.
        #[arg(long)]
        force: bool,
    },
    /// Freeze a running VM.
    Pause { name: String },
    /// Continue a paused VM.
    Resume { name: String },
    /// Delete a VM and its files.
    Delete {
        name: String,
        /// Also when it is running (QEMU is ended at once).
        #[arg(long)]
        force: bool,
    },
    /// Take a live checkpoint: the VM keeps running; pages the store
    /// already holds are not stored again.
    Checkpoint {
        name: String,
        /// Also send it to this peer: only the pages it lacks (see
        /// `dwcp node list`).
        #[arg(long, value_name = "NODE")]
        replicate_to: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Move a running VM to another node, live (see `dwcp node list`).
    Migrate {
        name: String,
        #[arg(long, value_name = "NODE", required_unless_present = "cancel")]
        to: Option<String>,
        /// Cancel the VM's running migration instead (it runs on here).
        #[arg(long, conflicts_with = "to")]
        cancel: bool,
        /// Give up (the VM runs on here) after this many seconds. Default:
        /// five times what the VM's memory takes on the measured link, at
        /// least two minutes.
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
        deadline: Option<u64>,
        /// Print only the JSON summary at the end.
        #[arg(long)]
        json: bool,
    },
    /// Start a new VM from a checkpoint (see `dwcp checkpoint list`).
    Restore {
        /// Checkpoint id, `VM@N`.
        checkpoint: String,
        /// Name of the new VM.
        #[arg(long)]
        name: String,
        /// Leave the new VM paused (`dwcp vm resume` starts it).
        #[arg(long)]
        paused: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print the serial console output.
    Console {
        name: String,
        /// Keep printing new output until the VM stops (Ctrl-C to leave).
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Args)]
pub struct CheckpointCommand {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    action: CheckpointAction,
}

#[derive(Subcommand)]
enum CheckpointAction {
    /// List checkpoints, oldest first.
    List {
        /// Only those of this VM.
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one checkpoint.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Send a checkpoint to a peer: only the pages and parts it lacks.
    Replicate {
        id: String,
        #[arg(long, value_name = "NODE")]
        to: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a checkpoint (later checkpoints of the VM stay whole) and
    /// free the pages nothing else needs.
    Delete { id: String },
    /// Re-hash stored pages: every object, or what one checkpoint uses.
    /// Exits with status 1 when something is missing or corrupt.
    Verify {
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct NodeCommand {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    action: NodeAction,
}

#[derive(Subcommand)]
enum NodeAction {
    /// The node's accelerator (and why), QEMU, host size and VM counts.
    Info {
        #[arg(long)]
        json: bool,
    },
    /// The other nodes this one knows, with their measured RTT and goodput.
    List {
        #[arg(long)]
        json: bool,
    },
}

fn size(s: &str) -> Result<u64, String> {
    parse_bytes(s)
}

fn label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

/// Paths are resolved here, where the user typed them: the agent has its
/// own working directory.
fn absolute(p: Option<String>) -> anyhow::Result<Option<String>> {
    p.map(|p| {
        let path = Path::new(&p);
        if path.is_absolute() {
            return Ok(p);
        }
        let cwd = std::env::current_dir().context("cannot read the current directory")?;
        Ok(cwd.join(path).display().to_string())
    })
    .transpose()
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn uptime(secs: Option<f64>) -> String {
    match secs {
        None => "-".into(),
        Some(s) if s < 120.0 => format!("{s:.0}s"),
        Some(s) if s < 7200.0 => format!("{:.0}m", s / 60.0),
        Some(s) => format!("{:.1}h", s / 3600.0),
    }
}

fn print_table(vms: &[VmInfo]) {
    let rows: Vec<[String; 7]> = vms
        .iter()
        .map(|v| {
            [
                v.spec.name.clone(),
                v.state.to_string(),
                v.spec.vcpus.to_string(),
                format_bytes(v.spec.memory_bytes),
                v.accel.clone().unwrap_or_else(|| "-".into()),
                v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                uptime(v.uptime_secs),
            ]
        })
        .collect();
    let head = ["NAME", "STATE", "VCPUS", "MEMORY", "ACCEL", "PID", "UPTIME"];
    let mut width: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(head.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_vm(v: &VmInfo) {
    let mut kv: Vec<(&str, String)> = vec![
        ("name", v.spec.name.clone()),
        ("state", v.state.to_string()),
        ("desired", v.desired.to_string()),
        ("vcpus", v.spec.vcpus.to_string()),
        ("memory", format_bytes(v.spec.memory_bytes)),
    ];
    if let Some(r) = v.resident_bytes {
        kv.push(("resident", format_bytes(r)));
    }
    if let Some(a) = &v.accel {
        kv.push(("accel", a.clone()));
    }
    if let Some(p) = v.pid {
        kv.push(("pid", p.to_string()));
    }
    if v.uptime_secs.is_some() {
        kv.push(("uptime", uptime(v.uptime_secs)));
    }
    for (k, p) in [
        ("kernel", &v.spec.kernel),
        ("initrd", &v.spec.initrd),
        ("append", &v.spec.append),
        ("disk", &v.spec.disk),
    ] {
        if let Some(p) = p {
            kv.push((k, p.clone()));
        }
    }
    if !v.spec.labels.is_empty() {
        let l: Vec<String> = v
            .spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        kv.push(("labels", l.join(",")));
    }
    if let Some(e) = &v.last_error {
        kv.push(("last error", e.clone()));
    }
    for (k, val) in kv {
        println!("{:<11} {val}", format!("{k}:"));
    }
}

fn print_node(n: &NodeInfo) {
    for (k, v) in [
        ("name", n.name.clone()),
        ("accel", format!("{} ({})", n.accel, n.accel_reason)),
        ("qemu", format!("{} {}", n.qemu_binary, n.qemu_version)),
        (
            "host",
            format!(
                "{} CPUs, {}",
                n.host_cpus,
                format_bytes(n.host_memory_bytes)
            ),
        ),
        (
            "vms",
            format!("{} ({} running)", n.vms_total, n.vms_running),
        ),
        (
            "replicas",
            format!(
                "{} of memory held for migrations here (up to {})",
                format_bytes(n.warm_memory_bytes),
                format_bytes(n.warm_memory_budget_bytes)
            ),
        ),
        ("data dir", n.data_dir.clone()),
        ("agent", n.agent_version.clone()),
    ] {
        println!("{:<9} {v}", format!("{k}:"));
    }
}

pub async fn vm(cmd: VmCommand) -> anyhow::Result<()> {
    let c = cmd.target.client()?;
    match cmd.action {
        VmAction::Create {
            name,
            memory,
            vcpus,
            kernel,
            initrd,
            append,
            disk,
            labels,
            no_start,
            json,
        } => {
            let spec = VmSpec {
                name,
                vcpus,
                memory_bytes: memory,
                kernel: absolute(kernel)?,
                initrd: absolute(initrd)?,
                append,
                disk: absolute(disk)?,
                labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
            };
            let v = c.create(&spec, !no_start).await?;
            if json {
                print_json(&v)?;
            } else {
                println!("created VM {} ({})", v.spec.name, v.state);
            }
        }
        VmAction::List { json } => {
            let vms = c.list().await?;
            if json {
                print_json(&vms)?;
            } else {
                print_table(&vms);
            }
        }
        VmAction::Show { name, json } => {
            let v = c.show(&name).await?;
            if json {
                print_json(&v)?;
            } else {
                print_vm(&v);
            }
        }
        VmAction::Start { name } => {
            let v = c.start(&name).await?;
            println!("started VM {} (pid {})", v.spec.name, v.pid.unwrap_or(0));
        }
        VmAction::Stop {
            name,
            timeout,
            force,
        } => {
            let v = c
                .stop(
                    &name,
                    &StopRequest {
                        timeout_secs: timeout,
                        force,
                    },
                )
                .await?;
            println!("VM {} is {}", v.spec.name, v.state);
        }
        VmAction::Pause { name } => {
            let v = c.pause(&name).await?;
            println!("VM {} is {}", v.spec.name, v.state);
        }
        VmAction::Resume { name } => {
            let v = c.resume(&name).await?;
            println!("VM {} is {}", v.spec.name, v.state);
        }
        VmAction::Delete { name, force } => {
            c.delete(&name, force).await?;
            println!("deleted VM {name}");
        }
        VmAction::Checkpoint {
            name,
            replicate_to,
            json,
        } => {
            if !json {
                eprintln!("checkpointing VM {name} (it keeps running) ...");
            }
            let ck = c.checkpoint(&name, replicate_to.as_deref()).await?;
            if json {
                print_json(&ck)?;
            } else {
                println!(
                    "checkpoint {}: {} new pages, {} stored (of {} streamed), paused {}, took {}",
                    ck.id,
                    ck.new_pages,
                    format_bytes(ck.stored_bytes),
                    format_bytes(ck.stream_bytes),
                    ck.pause_ms.map_or("-".into(), |p| format!("{p} ms")),
                    ck.took_ms
                        .map_or("-".into(), |t| format!("{:.1} s", t as f64 / 1000.0)),
                );
                if let Some(r) = &ck.replicated {
                    print_replica(r);
                }
            }
        }
        VmAction::Migrate {
            name,
            to,
            cancel,
            deadline,
            json,
        } => {
            if cancel {
                c.cancel_migration(&name).await?;
                println!("cancelling the migration of VM {name}; it runs on here");
                return Ok(());
            }
            let to = to.unwrap_or_default();
            if !json {
                eprintln!(
                    "migrating VM {name} to {to} (it keeps running until the switch-over) ..."
                );
            }
            let run = c.migrate(&name, &to, deadline);
            tokio::pin!(run);
            let r = loop {
                tokio::select! {
                    r = &mut run => break r?,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                        if json {
                            continue;
                        }
                        if let Ok(p) = c.migration(&name).await {
                            let n = |k: &str| p[k].as_u64().unwrap_or(0);
                            eprintln!(
                                "  {:>5.1} s  {:<11} round {:>2}  sent {:>10}  wire {:>10}  dirty {:>10}  {:>7.1} Mbit/s  downtime ~{} ms  ETA {}",
                                p["elapsed_secs"].as_f64().unwrap_or(0.0),
                                p["status"].as_str().unwrap_or("?"),
                                n("round"),
                                format_bytes(n("stream_bytes")),
                                format_bytes(n("wire_bytes")),
                                format_bytes(n("remaining_bytes")),
                                p["rate_bps"].as_f64().unwrap_or(0.0) / 1e6,
                                n("expected_downtime_ms"),
                                p["eta_secs"].as_f64().map_or("-".into(), |e| format!("{e:.0} s")),
                            );
                        }
                    }
                }
            };
            if json {
                print_json(&r)?;
            } else {
                let n = |k: &str| r[k].as_u64().unwrap_or(0);
                println!(
                    "VM {name} runs on {to}: {:.1} s, {} on the wire for a {} stream ({} saved by dedup{}{}, {} by deltas, {} by compression), {} rounds, guest paused {}",
                    r["seconds"].as_f64().unwrap_or(0.0),
                    format_bytes(n("wire_bytes")),
                    format_bytes(n("stream_bytes")),
                    format_bytes(n("saved_by_dedup_bytes")),
                    if r["preloaded"].as_bool() == Some(true) {
                        format!(
                            ", {} pages as they were in a replica{}",
                            n("preloaded_pages"),
                            match n("mapped_pages") {
                                0 => String::new(),
                                m => format!(" ({m} of its pages mapped in place)"),
                            }
                        )
                    } else {
                        String::new()
                    },
                    match r["footprint"].as_str() {
                        Some(f) => format!(", pages of {to}'s footprint of migration {f}"),
                        None => String::new(),
                    },
                    format_bytes(n("saved_by_delta_bytes")),
                    format_bytes(n("saved_by_compression_bytes")),
                    n("rounds"),
                    r["guest_pause_ms"]
                        .as_u64()
                        .map_or("?".into(), |ms| format!("{ms} ms at most")),
                );
            }
        }
        VmAction::Restore {
            checkpoint,
            name,
            paused,
            json,
        } => {
            if !json {
                eprintln!("restoring {checkpoint} as VM {name} ...");
            }
            let v = c.restore(&checkpoint, &name, paused).await?;
            if json {
                print_json(&v)?;
            } else {
                println!(
                    "VM {} is {} (pid {}), from {checkpoint}",
                    v.spec.name,
                    v.state,
                    v.pid.unwrap_or(0)
                );
            }
        }
        VmAction::Console { name, follow } => {
            let mut out = std::io::stdout();
            c.console(&name, 0, follow, |chunk| {
                let _ = out.write_all(chunk);
                let _ = out.flush();
            })
            .await?;
        }
    }
    Ok(())
}

pub async fn checkpoint(cmd: CheckpointCommand) -> anyhow::Result<()> {
    let c = cmd.target.client()?;
    match cmd.action {
        CheckpointAction::List { vm, json } => {
            let mut list = c.checkpoints().await?;
            if let Some(vm) = vm {
                list.retain(|ck| ck.vm == vm);
            }
            if json {
                print_json(&list)?;
            } else {
                print_checkpoints(&list);
            }
        }
        CheckpointAction::Show { id, json } => {
            let ck = c.show_checkpoint(&id).await?;
            if json {
                print_json(&ck)?;
            } else {
                print_checkpoint(&ck);
            }
        }
        CheckpointAction::Replicate { id, to, json } => {
            let ck = c.replicate(&id, &to).await?;
            if json {
                print_json(&ck)?;
            } else if let Some(r) = &ck.replicated {
                print_replica(r);
            }
        }
        CheckpointAction::Delete { id } => {
            let r = c.delete_checkpoint(&id).await?;
            println!(
                "deleted checkpoint {id}; freed {} objects ({})",
                r.objects_removed,
                format_bytes(r.bytes_removed)
            );
        }
        CheckpointAction::Verify { id, json } => {
            let r = c.verify_checkpoints(id.as_deref()).await?;
            if json {
                print_json(&r)?;
            } else {
                print_verify(&r);
            }
            if !r.ok {
                bail!("the page store has missing or corrupt data (see above)");
            }
        }
    }
    Ok(())
}

fn print_replica(r: &dwcp_api::ReplicaInfo) {
    println!(
        "replicated to {} as {}: {} of {} objects sent, {} on the wire, {:.1} s",
        r.peer,
        r.id,
        r.objects_sent,
        r.objects,
        format_bytes(r.bytes_sent),
        r.seconds
    );
}

fn print_checkpoints(list: &[CheckpointInfo]) {
    println!(
        "{:<24} {:<16} {:>9} {:>10} {:>10} {:>8}  CREATED",
        "ID", "VM", "MEMORY", "NEW PAGES", "STORED", "PAUSE"
    );
    for ck in list {
        println!(
            "{:<24} {:<16} {:>9} {:>10} {:>10} {:>8}  {}",
            ck.id,
            ck.vm,
            format_bytes(ck.memory_bytes),
            ck.new_pages,
            format_bytes(ck.stored_bytes),
            ck.pause_ms.map_or("-".into(), |p| format!("{p}ms")),
            time_of(ck.created_unix_ms),
        );
    }
}

fn time_of(unix_ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp((unix_ms / 1000) as i64)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                t.year(),
                t.month() as u8,
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| "-".into())
}

fn print_checkpoint(ck: &CheckpointInfo) {
    let rows: Vec<(&str, String)> = vec![
        ("id", ck.id.clone()),
        ("vm", ck.vm.clone()),
        ("created", time_of(ck.created_unix_ms)),
        ("parent", ck.parent.clone().unwrap_or_else(|| "-".into())),
        ("memory", format_bytes(ck.memory_bytes)),
        ("pages", format!("{} ({} zero)", ck.pages, ck.zero_pages)),
        (
            "changed",
            format!("{} pages since the parent", ck.changed_pages),
        ),
        (
            "new",
            format!("{} pages ({} as deltas)", ck.new_pages, ck.delta_pages),
        ),
        ("stored", format_bytes(ck.stored_bytes)),
        ("streamed", format_bytes(ck.stream_bytes)),
        ("encoding", format!("{:.2} s", ck.encode_secs)),
        (
            "digest",
            ck.memory_digest.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "pause",
            ck.pause_ms.map_or("-".into(), |p| {
                format!("{p} ms (QEMU said {} ms)", ck.qemu_downtime_ms.unwrap_or(0))
            }),
        ),
    ];
    for (k, v) in rows {
        println!("{:<9} {v}", format!("{k}:"));
    }
}

fn print_verify(r: &VerifyResult) {
    println!(
        "checked {} objects ({})",
        r.objects_checked,
        format_bytes(r.bytes_checked)
    );
    for o in &r.corrupt_objects {
        println!("  corrupt: {o}");
    }
    if r.dropped_objects > 0 {
        println!(
            "dropped {} corrupt objects: the next checkpoint of those pages stores them again",
            r.dropped_objects
        );
    }
    for h in &r.checkpoints {
        if h.ok {
            println!("{:<24} ok", h.id);
        } else {
            println!("{:<24} BROKEN", h.id);
            for p in &h.problems {
                println!("  {p}");
            }
            if h.more_problems > 0 {
                println!("  ... and {} more", h.more_problems);
            }
        }
    }
}

pub async fn node(cmd: NodeCommand) -> anyhow::Result<()> {
    let c = cmd.target.client()?;
    match cmd.action {
        NodeAction::List { json } => {
            let peers = c.peers().await?;
            if json {
                print_json(&peers)?;
            } else {
                println!(
                    "{:<16} {:<22} {:<8} {:>9} {:>12} {:>7}  LAST ERROR",
                    "NAME", "ADDRESS", "STATE", "RTT", "GOODPUT", "STREAMS"
                );
                for p in &peers {
                    println!(
                        "{:<16} {:<22} {:<8} {:>9} {:>12} {:>7}  {}",
                        p.name,
                        p.addr,
                        p.state,
                        p.rtt_ms.map_or("-".into(), |r| format!("{r:.1} ms")),
                        p.goodput_bps
                            .map_or("-".into(), |g| format!("{:.1} Mbit/s", g / 1e6)),
                        p.streams.map_or("-".into(), |s| s.to_string()),
                        p.last_error.as_deref().unwrap_or("")
                    );
                }
            }
        }
        NodeAction::Info { json } => {
            let n = c.node().await?;
            if json {
                print_json(&n)?;
            } else {
                print_node(&n);
            }
        }
    }
    Ok(())
}

/// One line for the user: the error and its causes, each said once.
pub fn error_line(e: &anyhow::Error) -> String {
    if let Some(ClientError::Api {
        message,
        causes,
        code,
        ..
    }) = e.downcast_ref::<ClientError>()
    {
        let mut s = message.clone();
        for c in causes {
            s.push_str(": ");
            s.push_str(c);
        }
        return format!("{s} [{code}]");
    }
    format!("{e:#}")
}

/// Refuses to go on when `cond` fails: used by the demo's checks.
pub fn ensure(cond: bool, what: impl FnOnce() -> String) -> anyhow::Result<()> {
    if !cond {
        bail!("{}", what());
    }
    Ok(())
}
