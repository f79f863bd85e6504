//! `dwcp bench checkpoint`: HDE on real guest streams, against zstd of the
//! raw stream and QEMU's own compressed migration (multifd + zstd) of the
//! same guest, measured in the same run.
//!
//! For each guest (a fill and a dirty rate): boot the test guest under TCG,
//! capture its full migration stream, let it run, capture again, and
//! migrate it once more with QEMU's multifd + zstd (bytes counted). Then,
//! on one core each: zstd -1 and -3 of the first stream; HDE checkpoints of
//! both streams into a fresh page store (bytes stored, encode rate); a
//! second pass over the first stream with every page already stored (the
//! hash-and-dedup rate); and a restore of each checkpoint, parsed back and
//! compared page by page with the memory the stream described.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use dwcp_hde::{Digest, PageStore};
use dwcp_hypervisor::{launch, Accel, LaunchSpec, Launched, QemuBinary};
use dwcp_vmstream::{Item, PageData, StreamParser};
use serde_json::json;
use tokio::io::AsyncReadExt;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(clap::Subcommand)]
enum BenchWhat {
    /// Checkpoint encoding and storage against zstd and QEMU multifd+zstd.
    Checkpoint(CheckpointBench),
}

#[derive(Args)]
struct CheckpointBench {
    /// Directory with the test guest [default: $DWCP_GUEST_DIR, else ./target/guest].
    #[arg(long, env = "DWCP_GUEST_DIR")]
    guest_dir: Option<PathBuf>,
    /// Guest memory.
    #[arg(long, default_value = "512M", value_parser = dwcp_api::parse_bytes)]
    memory: u64,
    /// Memory the workload fills and dirties, in MiB.
    #[arg(long, default_value_t = 256)]
    workload_mb: u64,
    /// Fills to run (zero, text, random, mixed).
    #[arg(long, value_delimiter = ',', default_value = "zero,text,random")]
    fills: Vec<String>,
    /// Dirty rates to run, pages per second (0: an idle guest).
    #[arg(long, value_delimiter = ',', default_value = "0,2000")]
    dirty: Vec<u64>,
    /// small (8 bytes of a page) or full (the whole page) writes.
    #[arg(long, default_value = "small")]
    write: String,
    /// Seconds the guest runs between the two checkpoints.
    #[arg(long, default_value_t = 10)]
    between_secs: u64,
    /// zstd level of the page store.
    #[arg(long, default_value_t = 3)]
    level: i32,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchWhat::Checkpoint(b) => checkpoint(b).await,
    }
}

/// What one guest gave.
struct Row {
    guest: String,
    stream_bytes: u64,
    zstd1: (u64, f64),
    zstd3: (u64, f64),
    multifd_bytes: u64,
    full_stored: u64,
    full_rate: f64,
    dedup_rate: f64,
    hash_rate: f64,
    changed_pages: u64,
    incr_stored: u64,
    exact: bool,
}

async fn checkpoint(b: CheckpointBench) -> anyhow::Result<()> {
    let guest = b
        .guest_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/guest"));
    for f in ["vmlinuz", "initrd.img"] {
        if !guest.join(f).exists() {
            bail!(
                "{} is missing: build the test guest with `make guest`",
                guest.join(f).display()
            );
        }
    }
    let qemu = QemuBinary::detect(Path::new("qemu-system-x86_64")).await?;
    println!(
        "dwcp bench checkpoint: {} guests, {} MiB VM, {} MiB workload, {} writes, {} s between checkpoints, store zstd level {}",
        b.fills.len() * b.dirty.len(),
        b.memory >> 20,
        b.workload_mb,
        b.write,
        b.between_secs,
        b.level
    );
    let mut rows = Vec::new();
    for fill in &b.fills {
        for &dirty in &b.dirty {
            let name = format!(
                "{fill}, {}",
                if dirty == 0 {
                    "idle".to_string()
                } else {
                    format!("{dirty} pages/s")
                }
            );
            println!("\n==> {name}: booting and capturing");
            let row = one_guest(&b, &qemu, &guest, fill, dirty, name)
                .await
                .with_context(|| format!("guest fill={fill} dirty={dirty}"))?;
            rows.push(row);
        }
    }
    print_table(&rows);
    Ok(())
}

async fn one_guest(
    b: &CheckpointBench,
    qemu: &QemuBinary,
    guest: &Path,
    fill: &str,
    dirty: u64,
    name: String,
) -> anyhow::Result<Row> {
    let tmp = tempfile::Builder::new().prefix("dwcp-bench-").tempdir()?;
    let spec = LaunchSpec {
        name: "bench".into(),
        vcpus: 1,
        memory_bytes: b.memory,
        kernel: Some(guest.join("vmlinuz")),
        initrd: Some(guest.join("initrd.img")),
        append: Some(format!(
            "console=ttyS0 quiet panic=-1 dwcp.mem_mb={} dwcp.dirty_pages={dirty} dwcp.fill={fill} dwcp.write={}",
            b.workload_mb, b.write
        )),
        disk: None,
        accel: Accel::Tcg,
        qmp_socket: tmp.path().join("qmp.sock"),
        console_log: tmp.path().join("console.log"),
        qemu_log: tmp.path().join("qemu.log"),
        incoming: None,
        start_paused: false,
        memory_file: None,
    };
    let mut l = launch(qemu, &spec, Duration::from_secs(10)).await?;
    let result = async {
        wait_ready(&spec.console_log, Duration::from_secs(300)).await?;
        let s1 = capture(&l, tmp.path(), false).await?;
        tokio::time::sleep(Duration::from_secs(b.between_secs)).await;
        let s2 = capture(&l, tmp.path(), false).await?;
        let multifd = capture(&l, tmp.path(), true).await?;
        let console = std::fs::read_to_string(&spec.console_log).unwrap_or_default();
        if console.contains("CORRUPT") {
            bail!("the guest reports CORRUPT memory");
        }
        Ok((s1.bytes, s2.bytes, multifd.total))
    }
    .await;
    let _ = l.child.kill().await;
    let (s1, s2, multifd_bytes) = result?;
    println!(
        "    streams: {} and {} bytes; QEMU multifd+zstd {} bytes",
        s1.len(),
        s2.len(),
        multifd_bytes
    );
    let level = b.level;
    let row = tokio::task::spawn_blocking(move || measure(name, &s1, &s2, multifd_bytes, level))
        .await??;
    Ok(row)
}

/// Waits for the workload to have filled its memory (its first TICK).
async fn wait_ready(console: &Path, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let c = std::fs::read_to_string(console).unwrap_or_default();
        if c.lines().any(|l| l.starts_with("TICK ")) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the guest printed no TICK within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Captured {
    bytes: Vec<u8>,
    /// Bytes over all connections (multifd opens several).
    total: u64,
}

/// Migrates the running guest into a socket (plain, or multifd with zstd
/// on two channels), then resumes it.
async fn capture(l: &Launched, dir: &Path, multifd: bool) -> anyhow::Result<Captured> {
    let sock = dir.join("capture.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)?;
    let caps = json!({"capabilities": [
        {"capability": "multifd", "state": multifd},
        {"capability": "xbzrle", "state": false},
        {"capability": "return-path", "state": false},
    ]});
    l.qmp
        .execute("migrate-set-capabilities", Some(caps))
        .await?;
    let mut params = json!({"max-bandwidth": 64u64 << 30, "downtime-limit": 300});
    if multifd {
        params["multifd-compression"] = json!("zstd");
        params["multifd-channels"] = json!(2);
    }
    l.qmp
        .execute("migrate-set-parameters", Some(params))
        .await?;
    l.qmp
        .execute(
            "migrate",
            Some(json!({"uri": format!("unix:{}", sock.display())})),
        )
        .await?;
    // The main channel, then (multifd) one per channel; read all to the end.
    let conns = if multifd { 3 } else { 1 };
    let mut readers = Vec::new();
    for _ in 0..conns {
        let (mut c, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
            .await
            .context("QEMU did not connect")??;
        readers.push(tokio::spawn(async move {
            let mut v = Vec::new();
            c.read_to_end(&mut v).await.map(|_| v)
        }));
    }
    let mut bytes = Vec::new();
    let mut total = 0u64;
    for (i, r) in readers.into_iter().enumerate() {
        let v = tokio::time::timeout(Duration::from_secs(600), r)
            .await
            .context("the stream did not end")???;
        total += v.len() as u64;
        if i == 0 {
            bytes = v;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = l.qmp.execute("query-migrate", None).await?;
        match s["status"].as_str() {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => bail!("migration failed: {s}"),
            _ if Instant::now() > deadline => bail!("migration did not complete: {s}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    l.qmp.execute("cont", None).await?;
    let _ = std::fs::remove_file(&sock);
    Ok(Captured { bytes, total })
}

/// The memory a stream leaves behind: (block, page) -> digest.
fn final_memory(stream: &[u8]) -> anyhow::Result<HashMap<(u16, u64), Digest>> {
    let mut p = StreamParser::new();
    p.feed(stream);
    let mut mem = HashMap::new();
    let zero = Digest::zero_page();
    while let Some(item) = p.next_item()? {
        if let Item::Page(r) = item {
            let d = match &r.data {
                PageData::Fill(0) => zero,
                PageData::Fill(b) => Digest::of(&[*b; dwcp_vmstream::PAGE_SIZE]),
                PageData::Full(data) if data.iter().all(|&x| x == 0) => zero,
                PageData::Full(data) => Digest::of(&data[..]),
            };
            mem.insert((r.block, r.page_index()), d);
        }
    }
    p.finish()?;
    Ok(mem)
}

fn store_stream(
    store: &PageStore,
    vm: &str,
    stream: &[u8],
) -> anyhow::Result<(dwcp_hde::Manifest, f64)> {
    let t = Instant::now();
    let mut w = store.begin_checkpoint(vm)?;
    let mut p = StreamParser::new();
    for chunk in stream.chunks(1 << 20) {
        p.feed(chunk);
        while let Some(item) = p.next_item()? {
            w.push(item)?;
        }
    }
    p.finish()?;
    let m = w.finish(serde_json::Value::Null, None, None)?;
    Ok((m, t.elapsed().as_secs_f64()))
}

/// Restores `id` and checks every page against `want`.
fn restore_matches(
    store: &PageStore,
    id: &str,
    want: &HashMap<(u16, u64), Digest>,
) -> anyhow::Result<bool> {
    let got = {
        let mut r = store.restore_stream(id)?;
        let mut all = Vec::new();
        while let Some(c) = r.next_chunk(1 << 20)? {
            all.extend_from_slice(&c);
        }
        final_memory(&all)?
    };
    let zero = Digest::zero_page();
    let differs = want.iter().any(|(k, d)| got.get(k).unwrap_or(&zero) != d)
        || got.iter().any(|(k, d)| want.get(k).unwrap_or(&zero) != d);
    Ok(!differs)
}

fn zstd_of(stream: &[u8], level: i32) -> anyhow::Result<(u64, f64)> {
    let t = Instant::now();
    let z = zstd::bulk::compress(stream, level)?;
    Ok((
        z.len() as u64,
        stream.len() as f64 / t.elapsed().as_secs_f64(),
    ))
}

fn measure(
    name: String,
    s1: &[u8],
    s2: &[u8],
    multifd_bytes: u64,
    level: i32,
) -> anyhow::Result<Row> {
    let zstd1 = zstd_of(s1, 1)?;
    let zstd3 = zstd_of(s1, 3)?;
    let dir = tempfile::Builder::new()
        .prefix("dwcp-bench-store-")
        .tempdir()?;
    let store = PageStore::open(&dir.path().join("pages.redb"), level)?;
    let (full, full_secs) = store_stream(&store, "vm", s1)?;
    let (incr, _) = store_stream(&store, "vm", s2)?;
    // Every page known: what is left is parsing, hashing and lookups.
    let other = tempfile::Builder::new()
        .prefix("dwcp-bench-store-")
        .tempdir()?;
    let warm = PageStore::open(&other.path().join("pages.redb"), level)?;
    store_stream(&warm, "a", s1)?;
    let (_, dedup_secs) = store_stream(&warm, "b", s1)?;
    let page_bytes = full.stats.page_records as f64 * dwcp_vmstream::PAGE_SIZE as f64;
    let t = Instant::now();
    let mut x = 0u8;
    for c in s1.chunks(dwcp_vmstream::PAGE_SIZE) {
        x ^= Digest::of(c).0[0];
    }
    let hash_rate = s1.len() as f64 / t.elapsed().as_secs_f64();
    std::hint::black_box(x);
    let m1 = final_memory(s1)?;
    let m2 = final_memory(s2)?;
    let changed = m2.iter().filter(|(k, d)| m1.get(k) != Some(d)).count() as u64;
    let exact = restore_matches(&store, &full.id, &m1)? && restore_matches(&store, &incr.id, &m2)?;
    Ok(Row {
        guest: name,
        stream_bytes: s1.len() as u64,
        zstd1,
        zstd3,
        multifd_bytes,
        full_stored: full.stats.stored_bytes,
        full_rate: s1.len() as f64 / full_secs,
        dedup_rate: page_bytes / dedup_secs,
        hash_rate,
        changed_pages: changed,
        incr_stored: incr.stats.stored_bytes,
        exact,
    })
}

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}

fn print_table(rows: &[Row]) {
    println!("\nFull checkpoint (bytes kept, MB) against the raw stream compressed whole, and QEMU multifd+zstd (2 channels, level 1):\n");
    println!(
        "| guest | stream | zstd -1 | zstd -3 | QEMU multifd+zstd | HDE full | HDE / best other |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let best = r.zstd1.0.min(r.zstd3.0).min(r.multifd_bytes).max(1);
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} |",
            r.guest,
            mb(r.stream_bytes),
            mb(r.zstd1.0),
            mb(r.zstd3.0),
            mb(r.multifd_bytes),
            mb(r.full_stored),
            r.full_stored as f64 / best as f64
        );
    }
    println!("\nIncremental checkpoint and encoding rates (one core; MB/s of stream, hash+dedup in MB/s of page data):\n");
    println!("| guest | pages changed | changed MB | HDE incremental MB | stored / changed | full encode | zstd -1 | zstd -3 | hash+dedup | BLAKE3 alone | restore exact |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let changed_bytes = r.changed_pages * dwcp_vmstream::PAGE_SIZE as u64;
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
            r.guest,
            r.changed_pages,
            mb(changed_bytes),
            mb(r.incr_stored),
            if changed_bytes == 0 {
                "-".to_string()
            } else {
                format!("{:.2}", r.incr_stored as f64 / changed_bytes as f64)
            },
            r.full_rate / 1e6,
            r.zstd1.1 / 1e6,
            r.zstd3.1 / 1e6,
            r.dedup_rate / 1e6,
            r.hash_rate / 1e6,
            if r.exact { "yes" } else { "NO" }
        );
    }
}
