//! `dwcp demo`: a temporary agent, the test guest booted on it, its TICK
//! lines shown live, a pause and a resume proven from the guest's own
//! output, two live checkpoints (the second storing only what changed), a
//! restore that goes on counting from the checkpoint, and everything
//! cleaned up.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use dwcp_agent::{AccelChoice, AgentConfig};
use dwcp_api::{format_bytes, Client, StopRequest, VmSpec};

use crate::cli::ensure;

#[derive(Args)]
pub struct DemoArgs {
    /// Directory with the test guest (vmlinuz, initrd.img), as written by
    /// `scripts/build-guest` [default: $DWCP_GUEST_DIR, else ./target/guest].
    #[arg(long, env = "DWCP_GUEST_DIR")]
    guest_dir: Option<PathBuf>,
    /// auto (KVM only if it really boots a guest), kvm or tcg.
    #[arg(long, default_value = "auto")]
    accel: AccelChoice,
    /// Memory the guest's workload owns and dirties, in MiB.
    #[arg(long, default_value_t = 64)]
    workload_mb: u64,
    /// Skip the WAN part (two agents on a netlab WAN; needs root).
    #[arg(long)]
    no_wan: bool,
    /// The WAN's rate each way (netlab syntax).
    #[arg(long, default_value = "100mbit")]
    wan_rate: String,
    /// The WAN's one-way delay.
    #[arg(long, default_value = "40ms")]
    wan_delay: String,
    /// The WAN's packet loss.
    #[arg(long, default_value = "1%")]
    wan_loss: String,
    /// Memory the WAN guest's workload fills with text, in MiB.
    #[arg(long, default_value_t = 192)]
    wan_workload_mb: u64,
}

pub(crate) struct Steps {
    rows: Vec<(String, Duration)>,
    t: Instant,
}

impl Steps {
    fn new() -> Steps {
        Steps {
            rows: Vec::new(),
            t: Instant::now(),
        }
    }
    pub(crate) fn begin(&mut self, what: &str) {
        println!("\n==> {what}");
        self.t = Instant::now();
    }
    pub(crate) fn done(&mut self, what: &str) {
        let d = self.t.elapsed();
        println!("    done in {:.2} s", d.as_secs_f64());
        self.rows.push((what.to_owned(), d));
    }
}

/// TICK numbers in console text.
pub(crate) fn ticks(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("TICK "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

struct Console<'a> {
    client: &'a Client,
    name: &'a str,
    offset: u64,
    text: String,
}

impl Console<'_> {
    /// Reads new console output, printing new lines indented.
    async fn poll(&mut self) -> anyhow::Result<()> {
        let mut new = Vec::new();
        self.client
            .console(self.name, self.offset, false, |c| new.extend_from_slice(c))
            .await?;
        self.offset += new.len() as u64;
        let s = String::from_utf8_lossy(&new);
        for line in s.lines().filter(|l| !l.trim().is_empty()) {
            println!("    | {}", line.trim_end());
        }
        self.text.push_str(&s);
        Ok(())
    }

    fn last_tick(&self) -> Option<u64> {
        ticks(&self.text).last().copied()
    }

    /// Waits until the guest has printed `n` more TICK lines.
    async fn wait_ticks(&mut self, n: usize, within: Duration) -> anyhow::Result<()> {
        let have = ticks(&self.text).len();
        let deadline = Instant::now() + within;
        while ticks(&self.text).len() < have + n {
            if Instant::now() > deadline {
                bail!("the guest printed no TICK line for {} s", within.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.poll().await?;
        }
        if self.text.contains("CORRUPT") {
            bail!("the guest's workload reported CORRUPT memory");
        }
        Ok(())
    }
}

/// The test guest's directory, checked.
pub(crate) fn guest_dir() -> anyhow::Result<PathBuf> {
    let guest = std::env::var_os("DWCP_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/guest"));
    let guest = std::fs::canonicalize(&guest).with_context(|| {
        format!(
            "no test guest at {} (build it with `scripts/build-guest {}`, as `make demo` does)",
            guest.display(),
            guest.display()
        )
    })?;
    for f in ["vmlinuz", "initrd.img"] {
        ensure(guest.join(f).is_file(), || {
            format!(
                "{} is missing (run scripts/build-guest {})",
                guest.join(f).display(),
                guest.display()
            )
        })?;
    }
    Ok(guest)
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if let Some(g) = &args.guest_dir {
        std::env::set_var("DWCP_GUEST_DIR", g);
    }
    let guest = guest_dir()?;
    let total = Instant::now();
    let mut steps = Steps::new();

    steps.begin("starting a temporary agent");
    let data = tempfile::Builder::new()
        .prefix("dwcp-demo-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let cfg = AgentConfig {
        data_dir: data.path().to_owned(),
        api: "127.0.0.1:0".parse()?,
        accel: args.accel,
        probe_guest_dir: Some(guest.clone()),
        node_name: Some("demo".into()),
        ..AgentConfig::default()
    };
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(dwcp_agent::run(
        cfg,
        move |a| {
            let _ = addr_tx.send(a);
        },
        async {
            let _ = stop_rx.await;
        },
    ));
    let addr = match addr_rx.await {
        Ok(a) => a,
        Err(_) => match agent.await {
            Ok(Err(e)) => return Err(anyhow::Error::new(e).context("the agent did not start")),
            _ => bail!("the agent did not start"),
        },
    };
    let client = Client::new(&format!("http://{addr}"))?;
    println!(
        "    agent API at http://{addr}, data in {}",
        data.path().display()
    );
    steps.done("start agent");

    let result = story(&client, &guest, args.workload_mb, &mut steps).await;
    let accel = client
        .node()
        .await
        .map(|n| n.accel)
        .unwrap_or_else(|_| "tcg".into());

    steps.begin("stopping the agent and removing its data");
    let _ = client.delete("demo", true).await;
    let _ = client.delete("demo-copy", true).await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
    drop(data);
    steps.done("clean up");

    let wan = if result.is_err() || args.no_wan {
        Ok(())
    } else if unsafe { libc::geteuid() } != 0 {
        println!("\n(the WAN part is skipped: it needs root for network namespaces)");
        Ok(())
    } else {
        let dir = tempfile::Builder::new()
            .prefix("dw")
            .tempdir_in("/tmp")
            .context("cannot create a temporary directory")?;
        let wan_args = crate::demo_wan::WanArgs {
            rate: args.wan_rate.clone(),
            delay: args.wan_delay.clone(),
            loss: args.wan_loss.clone(),
            workload_mb: args.wan_workload_mb,
            accel,
        };
        let mut wan_steps = Steps::new();
        let r = tokio::task::block_in_place(|| {
            crate::demo_wan::run(&wan_args, dir.path(), &mut wan_steps)
        });
        steps.rows.extend(wan_steps.rows);
        r
    };

    println!("\nSteps:");
    for (what, d) in &steps.rows {
        println!("  {what:<32} {:>7.2} s", d.as_secs_f64());
    }
    println!("  {:<32} {:>7.2} s", "total", total.elapsed().as_secs_f64());
    result?;
    wan?;
    println!("\ndemo OK: the guest booted, kept counting with its memory intact, paused and resumed on request, and went on counting from a live checkpoint{}.",
        if args.no_wan { "" } else { "; on the WAN it moved between two agents and back, counting on" });
    Ok(())
}

async fn story(
    client: &Client,
    guest: &std::path::Path,
    workload_mb: u64,
    steps: &mut Steps,
) -> anyhow::Result<()> {
    steps.begin("choosing the accelerator (KVM only if it really boots a guest)");
    let node = loop {
        let n = client.node().await?;
        if n.accel != "detecting" {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("    {}: {}", node.accel, node.accel_reason);
    println!("    QEMU {} on {} CPUs", node.qemu_version, node.host_cpus);
    steps.done("detect accelerator");

    steps.begin("booting the test guest (VM \"demo\")");
    let memory_mb = (workload_mb + 128).next_multiple_of(64);
    let spec = VmSpec {
        name: "demo".into(),
        vcpus: 1,
        memory_bytes: memory_mb << 20,
        kernel: Some(guest.join("vmlinuz").display().to_string()),
        initrd: Some(guest.join("initrd.img").display().to_string()),
        append: Some(format!(
            "console=ttyS0 quiet panic=-1 dwcp.mem_mb={workload_mb} dwcp.dirty_pages=1000 dwcp.fill=mixed"
        )),
        disk: None,
        labels: [("role".to_owned(), "demo".to_owned())].into(),
    };
    let vm = client.create(&spec, true).await?;
    println!(
        "    QEMU pid {} ({}), {} MiB, workload owns {workload_mb} MiB",
        vm.pid.unwrap_or(0),
        vm.accel.unwrap_or_default(),
        memory_mb
    );
    steps.done("boot VM");

    steps.begin("watching the guest count (TICK lines from its serial console)");
    let mut console = Console {
        client,
        name: "demo",
        offset: 0,
        text: String::new(),
    };
    console.wait_ticks(4, Duration::from_secs(90)).await?;
    steps.done("first ticks");

    steps.begin("pausing the VM for 3 s");
    client.pause("demo").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    console.poll().await?;
    let before = console.last_tick();
    tokio::time::sleep(Duration::from_secs(3)).await;
    console.poll().await?;
    let after = console.last_tick();
    ensure(before == after, || {
        format!("the guest kept counting while paused ({before:?} -> {after:?})")
    })?;
    println!(
        "    no TICK while paused (last was {})",
        before.unwrap_or(0)
    );
    steps.done("pause");

    steps.begin("resuming the VM");
    client.resume("demo").await?;
    console.wait_ticks(3, Duration::from_secs(30)).await?;
    let next = console.last_tick().unwrap_or(0);
    ensure(next > before.unwrap_or(0), || {
        "the counter did not continue after resume".into()
    })?;
    println!(
        "    the counter continued from {} to {next}, memory self-check OK",
        before.unwrap_or(0)
    );
    steps.done("resume");

    steps.begin("live checkpoint (the guest keeps running)");
    let a = client.checkpoint("demo", None).await?;
    println!(
        "    {}: {} pages, {} new, {} stored of a {} stream, guest paused {} ms",
        a.id,
        a.pages,
        a.new_pages,
        format_bytes(a.stored_bytes),
        format_bytes(a.stream_bytes),
        a.pause_ms.unwrap_or(0)
    );
    console.wait_ticks(3, Duration::from_secs(30)).await?;
    steps.done("checkpoint 1");

    steps.begin("second checkpoint: only what the guest changed since");
    let b = client.checkpoint("demo", None).await?;
    let at = console.last_tick().unwrap_or(0);
    println!(
        "    {}: {} pages changed, {} stored ({} as deltas), guest paused {} ms",
        b.id,
        b.changed_pages,
        format_bytes(b.stored_bytes),
        b.delta_pages,
        b.pause_ms.unwrap_or(0)
    );
    steps.done("checkpoint 2");

    steps.begin(&format!("restoring {} as VM \"demo-copy\"", b.id));
    let copy = client.restore(&b.id, "demo-copy", false).await?;
    println!(
        "    demo-copy is {} (QEMU pid {})",
        copy.state,
        copy.pid.unwrap_or(0)
    );
    let mut copy_console = Console {
        client,
        name: "demo-copy",
        offset: 0,
        text: String::new(),
    };
    copy_console.wait_ticks(3, Duration::from_secs(60)).await?;
    let first = ticks(&copy_console.text).first().copied().unwrap_or(0);
    ensure(first >= at && first <= at + 3, || {
        format!("the copy started counting at {first}, the checkpoint was taken after {at}")
    })?;
    println!("    the copy went on from TICK {first} (checkpoint taken after {at}), memory self-check OK");
    client.delete("demo-copy", true).await?;
    steps.done("restore");

    steps.begin("stopping the VM (ACPI power button)");
    let v = client
        .stop(
            "demo",
            &StopRequest {
                timeout_secs: Some(20),
                force: false,
            },
        )
        .await?;
    println!("    VM is {}", v.state);
    steps.done("stop VM");
    Ok(())
}
