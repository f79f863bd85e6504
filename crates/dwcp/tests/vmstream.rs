//! The stream parser on real QEMU 10 streams: a guest dirtying memory is
//! migrated over several rounds into a socket; the bytes, parsed in pieces
//! of varying size and written back, are exactly what QEMU sent.

mod common;

use std::time::Duration;

use common::*;
use dwcp_hypervisor::{launch, Accel, LaunchSpec, QemuBinary};
use dwcp_vmstream::{Item, MetaKind, PageData, SectionKind, StreamParser, StreamWriter};
use serde_json::json;
use tokio::io::AsyncReadExt;

/// Ends the test's QEMU even when an assertion fails.
struct KillQemusUnder(std::path::PathBuf);

impl Drop for KillQemusUnder {
    fn drop(&mut self) {
        kill_qemus_under(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_multi_round_streams_rebuild_byte_for_byte() {
    let tmp = tempfile::tempdir().expect("tmp");
    let _cleanup = KillQemusUnder(tmp.path().to_path_buf());
    let g = guest_dir();
    let spec = LaunchSpec {
        name: "stream".into(),
        vcpus: 1,
        memory_bytes: 128 << 20,
        kernel: Some(g.join("vmlinuz")),
        initrd: Some(g.join("initrd.img")),
        append: Some(
            "console=ttyS0 quiet panic=-1 dwcp.mem_mb=32 dwcp.dirty_pages=3000 dwcp.fill=mixed dwcp.write=full".into(),
        ),
        disk: None,
        accel: Accel::Tcg,
        qmp_socket: tmp.path().join("qmp.sock"),
        console_log: tmp.path().join("console.log"),
        qemu_log: tmp.path().join("qemu.log"),
        incoming: None,
        start_paused: false,
        memory_file: None,
    };
    let bin = QemuBinary::detect("qemu-system-x86_64".as_ref())
        .await
        .expect("QEMU");
    let mut l = launch(&bin, &spec, Duration::from_secs(10))
        .await
        .expect("launch");
    let console = spec.console_log.clone();
    tokio::task::spawn_blocking(move || {
        wait_for("TICK 1", Duration::from_secs(90), || {
            let c = std::fs::read_to_string(&console).unwrap_or_default();
            last_tick(&c).filter(|t| *t >= 1)
        })
    })
    .await
    .expect("wait");

    // Slow enough (24 MB/s against 12 MB/s of dirtying) for several rounds.
    let sock = tmp.path().join("out.sock");
    let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
    l.qmp
        .execute(
            "migrate-set-parameters",
            Some(json!({"max-bandwidth": 24_000_000, "downtime-limit": 100})),
        )
        .await
        .expect("params");
    l.qmp
        .execute(
            "migrate",
            Some(json!({"uri": format!("unix:{}", sock.display())})),
        )
        .await
        .expect("migrate");
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .expect("QEMU connects")
        .expect("accept");
    let mut stream = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), conn.read_to_end(&mut stream))
        .await
        .expect("stream ends")
        .expect("read");
    let status = l.qmp.execute("query-migrate", None).await.expect("status");
    assert_eq!(status["status"], "completed", "{status}");
    let _ = l.child.kill().await;

    // Parse in pieces of varying size; write back; compare.
    let mut parser = StreamParser::new();
    let mut writer = StreamWriter::new();
    let mut out = Vec::with_capacity(stream.len());
    let (mut parts, mut pages, mut continued, mut zero) = (0, 0u64, 0u64, 0u64);
    let mut at = 0;
    let mut size = 1usize;
    while at < stream.len() {
        size = (size * 7 + 13) % 70_001 + 1;
        let end = (at + size).min(stream.len());
        parser.feed(&stream[at..end]);
        at = end;
        while let Some(item) = parser.next_item().expect("parses") {
            match &item {
                Item::Meta {
                    kind: MetaKind::RamSection(SectionKind::Part),
                    ..
                } => parts += 1,
                Item::Page(p) => {
                    pages += 1;
                    continued += u64::from(!p.named);
                    zero += u64::from(matches!(p.data, PageData::Fill(_)));
                }
                _ => {}
            }
            writer.write(&item, &mut out).expect("writes");
        }
    }
    parser.finish().expect("complete");
    assert!(out == stream, "rebuilt stream differs from QEMU's");
    let ram_pages = (128u64 << 20) / 4096;
    assert!(parts >= 3, "only {parts} rounds");
    assert!(
        pages > ram_pages,
        "{pages} page records: no page was sent twice"
    );
    assert!(continued > pages / 2 && zero > 0);
    assert!(parser.blocks().iter().any(|b| b.name == "pc.ram"));

    // Cut anywhere, the stream is reported as truncated.
    for cut in [stream.len() - 1, stream.len() / 2, 100] {
        let mut p = StreamParser::new();
        p.feed(&stream[..cut]);
        while p.next_item().expect("parses").is_some() {}
        assert!(p.finish().is_err(), "cut at {cut} not noticed");
    }
}
