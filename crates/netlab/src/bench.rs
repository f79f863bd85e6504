//! `netlab bench`: how close the emulator comes to what it is told, measured
//! with real traffic (iperf3 from Debian, and UDP echoes) between the hosts
//! of a lab brought up for each scenario.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use dwcp_netlab::sys;
use dwcp_netlab::{Lab, LabConfig, LinkStats};
use serde_json::Value;

#[derive(Args)]
pub struct BenchArgs {
    /// Seconds each TCP measurement runs (after a 2 s warm-up).
    #[arg(long, default_value_t = 10)]
    secs: u32,
    /// Which parts: rate, rtt, loss, tcp, trace, ceiling (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "rate,rtt,loss,tcp,trace,ceiling"
    )]
    only: Vec<String>,
    /// Directory of the shared traces.
    #[arg(long, default_value = "../shared/traces")]
    traces: PathBuf,
}

struct Bench {
    secs: u32,
    n: u32,
}

fn our_cpu() -> f64 {
    sys::process_cpu_secs(std::process::id()).unwrap_or(0.0)
}

impl Bench {
    fn lab(&mut self, settings: &[(&str, &str)]) -> anyhow::Result<Lab> {
        self.n += 1;
        let name = format!("bench{}x{}", std::process::id() % 10000, self.n);
        let mut cfg = LabConfig::new(&name, &["a", "b"]);
        cfg.all = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        cfg.seed = 42 + self.n as u64;
        Ok(Lab::up(cfg)?)
    }

    /// iperf3 from a to b; returns (receiver bits/s, JSON).
    fn iperf(&self, lab: &Lab, extra: &[&str]) -> anyhow::Result<(f64, Value)> {
        let port = "5201";
        let mut server: Child = lab
            .command("b", "iperf3")?
            .args(["-s", "-1", "-p", port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start iperf3 (install it: scripts/setup)")?;
        std::thread::sleep(Duration::from_millis(300));
        let addr = lab.addr("b")?.to_string();
        let t = self.secs.to_string();
        let out = lab
            .command("a", "iperf3")?
            .args(["-c", &addr, "-p", port, "-t", &t, "-O", "2", "-J"])
            .args(extra)
            .output()
            .context("iperf3 client")?;
        let _ = server.kill();
        let _ = server.wait();
        let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
        if let Some(e) = v.get("error") {
            bail!("iperf3: {e}");
        }
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .or_else(|| v["end"]["sum"]["bits_per_second"].as_f64())
            .unwrap_or(0.0);
        Ok((bps, v))
    }

    fn a_to_b(lab: &Lab) -> LinkStats {
        lab.stats()
            .into_iter()
            .find(|s| s.from == "a" && s.to == "b")
            .unwrap_or_default()
    }

    fn rate(&mut self) -> anyhow::Result<()> {
        println!("\n## Rate (BBR, one stream, 10 ms RTT, {} s)\n", self.secs);
        println!("| configured | iperf3 goodput | goodput / (rate x 1448/1500) | emulator CPU |");
        println!("|---|---|---|---|");
        for mbit in [10, 100, 500, 1000] {
            let rate = format!("{mbit}mbit");
            let lab = self.lab(&[("rate", &rate), ("delay", "5ms")])?;
            let cpu0 = our_cpu();
            let t0 = Instant::now();
            let (bps, _) = self.iperf(&lab, &["-C", "bbr"])?;
            let cpu = (our_cpu() - cpu0) / t0.elapsed().as_secs_f64();
            // TCP payload per 1500-byte packet: 1500 - 20 (IP) - 32 (TCP + timestamps).
            let ideal = mbit as f64 * 1e6 * 1448.0 / 1500.0;
            println!(
                "| {mbit} Mbit/s | {:.1} Mbit/s | {:.1} % | {:.0} % of a core |",
                bps / 1e6,
                100.0 * bps / ideal,
                100.0 * cpu
            );
        }
        Ok(())
    }

    fn rtt(&mut self) -> anyhow::Result<()> {
        println!("\n## Round-trip time (UDP echo, 200 probes, 50 at 250 ms, idle link)\n");
        println!("| one-way delay | configured RTT | measured median | p99 | error of median |");
        println!("|---|---|---|---|---|");
        for ms in [0u64, 5, 50, 250] {
            let d = format!("{ms}ms");
            let lab = self.lab(&[("delay", &d), ("rate", "100mbit")])?;
            let probes = if ms >= 100 { 50 } else { 200 };
            let mut rtts = udp_echo_rtts(&lab, probes, Duration::from_millis(10))?;
            rtts.sort_by(f64::total_cmp);
            let med = rtts[rtts.len() / 2];
            let p99 = rtts[rtts.len() * 99 / 100];
            let want = 2.0 * ms as f64;
            println!(
                "| {ms} ms | {want:.0} ms | {med:.3} ms | {p99:.3} ms | {:+.3} ms ({:+.2} %) |",
                med - want,
                if want > 0.0 {
                    100.0 * (med - want) / want
                } else {
                    0.0
                }
            );
        }
        Ok(())
    }

    fn loss(&mut self) -> anyhow::Result<()> {
        println!(
            "\n## Loss (iperf3 UDP, 50 Mbit/s offered, {} s)\n",
            self.secs
        );
        println!(
            "| configured | counted by the emulator | seen by iperf3 | mean burst (packets) |"
        );
        println!("|---|---|---|---|");
        for (loss, burst) in [("1%", "1"), ("5%", "1"), ("2%", "4")] {
            let lab = self.lab(&[
                ("rate", "200mbit"),
                ("delay", "10ms"),
                ("loss", loss),
                ("burst", burst),
            ])?;
            let (_, v) = self.iperf(&lab, &["-u", "-b", "50M", "-l", "1400"])?;
            let s = Self::a_to_b(&lab);
            let counted = 100.0 * s.lost_packets as f64 / s.arrived_packets.max(1) as f64;
            let seen = v["end"]["sum"]["lost_percent"].as_f64().unwrap_or(f64::NAN);
            println!(
                "| {loss}{} | {counted:.3} % of {} packets | {seen:.3} % | {burst} configured |",
                if burst != "1" {
                    format!(" in bursts of {burst}")
                } else {
                    String::new()
                },
                s.arrived_packets
            );
        }
        Ok(())
    }

    fn tcp(&mut self) -> anyhow::Result<()> {
        let secs = self.secs.max(20);
        println!("\n## TCP on 100 Mbit/s, 100 ms RTT, 1 % loss ({secs} s each)\n");
        println!("| flows | goodput |");
        println!("|---|---|");
        let saved = self.secs;
        self.secs = secs;
        for (what, extra) in [
            ("1 x CUBIC", vec!["-C", "cubic"]),
            ("1 x BBR", vec!["-C", "bbr"]),
            ("8 x CUBIC (-P 8)", vec!["-C", "cubic", "-P", "8"]),
        ] {
            let lab = self.lab(&[("rate", "100mbit"), ("delay", "50ms"), ("loss", "1%")])?;
            let (bps, _) = self.iperf(&lab, &extra)?;
            println!("| {what} | {:.1} Mbit/s |", bps / 1e6);
        }
        self.secs = saved;
        Ok(())
    }

    fn trace(&mut self, dir: &std::path::Path) -> anyhow::Result<()> {
        println!(
            "\n## Trace replay (BBR, one stream, 20 ms RTT, {} s)\n",
            self.secs
        );
        println!(
            "| trace | scale | trace mean over the run | emulator delivered | iperf3 goodput |"
        );
        println!("|---|---|---|---|---|");
        for (file, scale) in [
            ("mahimahi/Verizon-LTE-short.down", "1"),
            ("pensieve_norway_hsdpa/norway_train_1", "50"),
        ] {
            let path = dir.join(file);
            if !path.exists() {
                bail!("trace {} not found (give --traces DIR)", path.display());
            }
            let p = path.display().to_string();
            let sched = dwcp_netlab::trace::RateSchedule::load(&path, scale.parse()?)?;
            let lab = self.lab(&[("trace", &p), ("trace-scale", scale), ("delay", "10ms")])?;
            let t0 = Instant::now();
            let (bps, _) = self.iperf(&lab, &["-C", "bbr"])?;
            let wall = t0.elapsed().as_secs_f64();
            let s = Self::a_to_b(&lab);
            // The schedule runs from the lab's start; average it over the run.
            let window = (wall * 1e9) as u64;
            let cap_bytes = sched.capacity_bytes(0, window);
            println!(
                "| {file} | x{scale} | {:.1} Mbit/s | {:.1} Mbit/s | {:.1} Mbit/s |",
                cap_bytes * 8.0 / wall / 1e6,
                s.delivered_bytes as f64 * 8.0 / wall / 1e6,
                bps / 1e6
            );
        }
        Ok(())
    }

    fn ceiling(&mut self) -> anyhow::Result<()> {
        println!("\n## Forwarding ceiling (no impairment, {} s)\n", self.secs);
        println!("| flows | goodput | packets/s | emulator CPU |");
        println!("|---|---|---|---|");
        for (what, extra) in [
            ("1 x BBR", vec!["-C", "bbr"]),
            ("4 x BBR", vec!["-C", "bbr", "-P", "4"]),
        ] {
            let lab = self.lab(&[])?;
            let cpu0 = our_cpu();
            let t0 = Instant::now();
            let (bps, _) = self.iperf(&lab, &extra)?;
            let wall = t0.elapsed().as_secs_f64();
            let cpu = (our_cpu() - cpu0) / wall;
            let s = Self::a_to_b(&lab);
            println!(
                "| {what} | {:.0} Mbit/s | {:.0} | {:.0} % of a core |",
                bps / 1e6,
                s.delivered_packets as f64 / wall,
                100.0 * cpu
            );
        }
        Ok(())
    }
}

/// Round trips of UDP probes from a to b and back, in ms.
fn udp_echo_rtts(lab: &Lab, count: usize, gap: Duration) -> anyhow::Result<Vec<f64>> {
    let a_addr = lab.addr("a")?;
    let b_addr = lab.addr("b")?;
    let ns_a = lab.hosts()[0].netns.clone();
    let ns_b = lab.hosts()[1].netns.clone();
    let server = sys::in_netns(&ns_b, move || {
        UdpSocket::bind(SocketAddr::new(b_addr.into(), 7007))
    })??;
    let client = sys::in_netns(&ns_a, move || {
        UdpSocket::bind(SocketAddr::new(a_addr.into(), 0))
    })??;
    server.set_read_timeout(Some(Duration::from_millis(200)))?;
    client.set_read_timeout(Some(Duration::from_secs(3)))?;
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut idle = 0;
        while idle < 20 {
            match server.recv_from(&mut buf) {
                Ok((n, from)) => {
                    idle = 0;
                    let _ = server.send_to(&buf[..n], from);
                }
                Err(_) => idle += 1,
            }
        }
    });
    let dest = SocketAddr::new(b_addr.into(), 7007);
    let mut rtts = Vec::with_capacity(count);
    let mut buf = [0u8; 64];
    for i in 0..count as u64 {
        let t = Instant::now();
        client.send_to(&i.to_le_bytes(), dest)?;
        loop {
            let n = client.recv(&mut buf).context("echo lost or late")?;
            if n == 8 && buf[..8] == i.to_le_bytes() {
                break;
            }
        }
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(gap);
    }
    drop(client);
    let _ = echo.join();
    Ok(rtts)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if Command::new("iperf3").arg("--version").output().is_err() {
        bail!("iperf3 is not installed (scripts/setup installs it)");
    }
    let mut b = Bench {
        secs: args.secs.max(3),
        n: 0,
    };
    let started = Instant::now();
    println!(
        "# netlab accuracy ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    for part in &args.only {
        match part.as_str() {
            "rate" => b.rate()?,
            "rtt" => b.rtt()?,
            "loss" => b.loss()?,
            "tcp" => b.tcp()?,
            "trace" => b.trace(&args.traces)?,
            "ceiling" => b.ceiling()?,
            other => bail!("unknown part {other:?} (rate, rtt, loss, tcp, trace, ceiling)"),
        }
    }
    println!("\n(bench took {:.0} s)", started.elapsed().as_secs_f64());
    Ok(())
}
