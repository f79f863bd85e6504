use std::collections::BTreeMap;

use dwcp_vmstream::{
    ram_section_end, ram_section_header, write_page, Item, PageData, SectionKind, StreamParser,
    PAGE_SIZE,
};
use redb::ReadableTable;

use super::*;
use crate::objects::{Location, INDEX, PACKS};

const RAM_PAGES: u64 = 256;

/// Guest memory: page index -> content (absent = zero).
type Memory = BTreeMap<u64, Box<[u8; PAGE_SIZE]>>;

fn text_page(seed: u64) -> Box<[u8; PAGE_SIZE]> {
    let words = [
        "alpha ", "beta ", "gamma ", "delta ", "epsilon ", "zeta ", "eta ",
    ];
    let mut p = Box::new([0u8; PAGE_SIZE]);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut at = 0;
    while at < PAGE_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = words[(x % 7) as usize].as_bytes();
        let n = w.len().min(PAGE_SIZE - at);
        p[at..at + n].copy_from_slice(&w[..n]);
        at += n;
    }
    p[..8].copy_from_slice(&seed.to_le_bytes());
    p
}

/// A QEMU-shaped stream: every page once in a PART (as QEMU's first round),
/// `resent` pages again in the END section, then device state.
fn stream(first: &Memory, last: &Memory, resent: &[u64]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(b"QEVM\0\0\0\x03");
    s.extend_from_slice(b"\x07\0\0\0\x0bpc-q35-10.0");
    s.extend_from_slice(b"\x01\0\0\0\x01\x03ram\0\0\0\0\0\0\0\x04");
    let ram = RAM_PAGES * PAGE_SIZE as u64;
    s.extend_from_slice(&((ram + 4096) | 0x04).to_be_bytes());
    s.push(6);
    s.extend_from_slice(b"pc.ram");
    s.extend_from_slice(&ram.to_be_bytes());
    s.push(7);
    s.extend_from_slice(b"pc.bios");
    s.extend_from_slice(&4096u64.to_be_bytes());
    s.extend_from_slice(&ram_section_end(1));
    s.extend_from_slice(&ram_section_header(SectionKind::Part, 1));
    for i in 0..RAM_PAGES {
        let data = match first.get(&i) {
            Some(p) => PageData::Full(p.clone()),
            None => PageData::Fill(0),
        };
        write_page(&mut s, i * 4096, (i == 0).then_some("pc.ram"), &data);
    }
    write_page(&mut s, 0, Some("pc.bios"), &PageData::Full(text_page(999)));
    s.extend_from_slice(&ram_section_end(1));
    s.extend_from_slice(&[8, 0, 11, 0, 0]);
    s.extend_from_slice(&ram_section_header(SectionKind::End, 1));
    for (n, i) in resent.iter().enumerate() {
        let data = match last.get(i) {
            Some(p) => PageData::Full(p.clone()),
            None => PageData::Fill(0),
        };
        write_page(&mut s, i * 4096, (n == 0).then_some("pc.ram"), &data);
    }
    s.extend_from_slice(&ram_section_end(1));
    s.extend_from_slice(b"\x04\0\0\0\x02\x05timer\0\0\0\0\0\0\0\x02\x01\x02\x7e\0\0\0\x02\x00");
    let json = br#"{"page_size": 4096}"#;
    s.push(6);
    s.extend_from_slice(&(json.len() as u32).to_be_bytes());
    s.extend_from_slice(json);
    s
}

fn memory(seeds: impl IntoIterator<Item = (u64, u64)>) -> Memory {
    seeds
        .into_iter()
        .map(|(i, seed)| (i, text_page(seed)))
        .collect()
}

fn checkpoint(store: &PageStore, vm: &str, bytes: &[u8]) -> Result<Manifest, HdeError> {
    let mut w = store.begin_checkpoint(vm)?;
    let mut p = StreamParser::new();
    for chunk in bytes.chunks(10_000) {
        p.feed(chunk);
        while let Some(item) = p.next_item().map_err(|e| HdeError::Stream(e.to_string()))? {
            w.push(item)?;
        }
    }
    w.finish(serde_json::json!({"spec": vm}), Some(12), Some(10))
}

/// Restores `id` and returns the memory the stream would give QEMU.
fn restored_memory(store: &PageStore, id: &str) -> Result<Memory, HdeError> {
    let mut r = store.restore_stream(id)?;
    let mut bytes = Vec::new();
    while let Some(chunk) = r.next_chunk(50_000)? {
        bytes.extend_from_slice(&chunk);
    }
    Ok(memory_of_stream(&bytes))
}

/// The memory (block 0) QEMU would hold after loading `bytes`.
fn memory_of_stream(bytes: &[u8]) -> Memory {
    memory_after_stream(Memory::new(), bytes)
}

/// The memory of block 0 after loading `bytes` into a QEMU whose memory
/// held `mem` (as one started on a memory file does).
fn memory_after_stream(mut mem: Memory, bytes: &[u8]) -> Memory {
    let mut p = StreamParser::new();
    p.feed(bytes);
    while let Some(item) = p.next_item().unwrap() {
        if let Item::Page(rec) = item {
            if rec.block != 0 {
                continue;
            }
            let index = rec.page_index();
            match rec.data {
                PageData::Fill(0) => {
                    mem.remove(&index);
                }
                PageData::Full(d) => {
                    mem.insert(index, d);
                }
                PageData::Fill(_) => panic!("nonzero fill"),
            }
        }
    }
    p.finish().unwrap();
    mem
}

fn open() -> (tempfile::TempDir, PageStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = PageStore::open(&dir.path().join("pages.redb"), 3).unwrap();
    (dir, store)
}

#[test]
fn a_checkpoint_restores_the_final_version_of_every_page() {
    let (_d, store) = open();
    let first = memory((0..200).map(|i| (i, i)));
    let mut last = first.clone();
    last.insert(5, text_page(5000));
    last.remove(&7);
    last.insert(250, text_page(250));
    let m = checkpoint(&store, "web", &stream(&first, &last, &[5, 7, 250])).unwrap();
    assert_eq!(m.id, "web@1");
    assert_eq!(m.stats.pages, RAM_PAGES + 1);
    assert_eq!(m.stats.changed_pages, 201);
    assert_eq!(m.stats.page_records, RAM_PAGES + 1 + 3);
    // Page 5's first version was superseded in the same stream.
    assert_eq!(m.stats.new_pages, 201);
    assert!(m.stats.superseded_bytes > 0);
    assert_eq!(m.stats.pause_ms, Some(12));
    assert_eq!(restored_memory(&store, "web@1").unwrap(), last);
    assert!(store.verify(None).unwrap().ok());
    // Nothing but what the checkpoint needs is kept.
    assert_eq!(store.collect_garbage().unwrap().objects_removed, 0);
    assert_eq!(store.usage().unwrap().objects, 201 + 3);
}

#[test]
fn an_incremental_checkpoint_stores_little_more_than_what_changed() {
    let (_d, store) = open();
    let one = memory((0..250).map(|i| (i, i)));
    let a = checkpoint(&store, "web", &stream(&one, &one, &[])).unwrap();
    // Small writes to 20 pages, full rewrites of 5.
    let mut two = one.clone();
    for i in 0..20u64 {
        two.get_mut(&(i * 7)).unwrap()[100..108].copy_from_slice(b"CHANGED!");
    }
    for i in 0..5u64 {
        two.insert(200 + i, text_page(10_000 + i));
    }
    let b = checkpoint(&store, "web", &stream(&two, &two, &[])).unwrap();
    assert_eq!(b.parent.as_deref(), Some("web@1"));
    assert_eq!(b.stats.changed_pages, 25);
    assert_eq!(b.stats.new_pages, 25);
    assert_eq!(b.stats.delta_pages, 20);
    let dirtied = 25 * PAGE_SIZE as u64;
    assert!(
        b.stats.stored_bytes * 2 < dirtied * 3,
        "{} stored for {dirtied} dirtied",
        b.stats.stored_bytes
    );
    assert!(b.stats.stored_bytes * 4 < a.stats.stored_bytes);
    assert_eq!(restored_memory(&store, "web@2").unwrap(), two);
    assert_eq!(restored_memory(&store, "web@1").unwrap(), one);

    // Deleting the parent keeps the child whole; the deltas' bases stay.
    store.delete("web@1").unwrap();
    assert_eq!(store.manifest("web@2").unwrap().parent, None);
    assert_eq!(restored_memory(&store, "web@2").unwrap(), two);
    assert!(store.verify(None).unwrap().ok());
    // Ids are never reused.
    let c = checkpoint(&store, "web", &stream(&two, &two, &[])).unwrap();
    assert_eq!(c.id, "web@3");
    assert_eq!(c.stats.new_pages, 0);
}

#[test]
fn identical_pages_are_kept_once_across_vms() {
    let (_d, store) = open();
    let mem = memory((0..100).map(|i| (i, i)));
    checkpoint(&store, "a", &stream(&mem, &mem, &[])).unwrap();
    let before = store.usage().unwrap();
    let b = checkpoint(&store, "b", &stream(&mem, &mem, &[])).unwrap();
    assert_eq!(b.parent, None);
    assert_eq!(b.stats.new_pages, 0);
    assert_eq!(store.usage().unwrap().objects, before.objects);
    store.delete("a@1").unwrap();
    assert_eq!(restored_memory(&store, "b@1").unwrap(), mem);
    store.delete("b@1").unwrap();
    assert_eq!(store.usage().unwrap().objects, 0);
}

#[test]
fn a_corrupt_or_missing_page_is_named_and_the_restore_refused() {
    let (_d, store) = open();
    let mem = memory((0..50).map(|i| (i, i)));
    checkpoint(&store, "web", &stream(&mem, &mem, &[])).unwrap();
    let (_, map) = store.page_map("web@1").unwrap();
    let victim = *map.get(0, 17).unwrap();
    // Flip one byte of the stored object, inside its pack.
    let tx = store.db().unwrap().begin_write().unwrap();
    {
        let index = tx.open_table(INDEX).unwrap();
        let loc = Location::decode(index.get(&victim.0[..]).unwrap().unwrap().value()).unwrap();
        let mut packs = tx.open_table(PACKS).unwrap();
        let mut v = packs.get(loc.pack).unwrap().unwrap().value().to_vec();
        v[(loc.offset + loc.len / 2) as usize] ^= 0x55;
        packs.insert(loc.pack, v.as_slice()).unwrap();
    }
    tx.commit().unwrap();
    let err = restored_memory(&store, "web@1").unwrap_err().to_string();
    assert!(
        err.contains(&victim.to_string()) && err.contains("offset 0x11000"),
        "{err}"
    );
    let report = store.verify(None).unwrap();
    assert!(!report.ok());
    assert_eq!(report.corrupt_objects.len(), 1);
    assert!(report.checkpoints[0].problems[0].contains("offset 0x11000"));
    let one = store.verify(Some("web@1")).unwrap();
    assert_eq!(one.checkpoints[0].problems.len(), 1);

    // A missing page refuses the restore before any byte is produced.
    let tx = store.db().unwrap().begin_write().unwrap();
    tx.open_table(INDEX).unwrap().remove(&victim.0[..]).unwrap();
    tx.commit().unwrap();
    let err = store.restore_stream("web@1").err().unwrap();
    assert!(matches!(err, HdeError::MissingPage { .. }), "{err}");
    assert!(err.to_string().contains("is missing"), "{err}");
}

#[test]
fn truncated_or_foreign_streams_leave_the_store_as_it_was() {
    let (_d, store) = open();
    let mem = memory((0..120).map(|i| (i, i)));
    let good = stream(&mem, &mem, &[]);
    checkpoint(&store, "web", &good).unwrap();
    let before = store.usage().unwrap();
    let other = memory((0..120).map(|i| (i, i + 777)));
    let s = stream(&other, &other, &[]);
    for cut in [s.len() / 2, s.len() - 3, 40] {
        let err = checkpoint(&store, "web", &s[..cut]).unwrap_err();
        assert!(err.to_string().contains("stream"), "{err}");
        assert_eq!(
            store.usage().unwrap().objects,
            before.objects,
            "cut at {cut}"
        );
    }
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(restored_memory(&store, "web@1").unwrap(), mem);
}

/// Run by the test below in a child process: writes most of a checkpoint,
/// then dies without any clean-up.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var("DWCP_HDE_CRASH_STORE") else {
        return;
    };
    let store = PageStore::open(std::path::Path::new(&path), 3).unwrap();
    let mem = memory((0..RAM_PAGES).map(|i| (i, i + 5)));
    let s = stream(&mem, &mem, &[]);
    let mut w = store.begin_checkpoint("web").unwrap();
    let mut p = StreamParser::new();
    p.feed(&s[..s.len() * 9 / 10]);
    while let Some(item) = p.next_item().unwrap() {
        w.push(item).unwrap();
    }
    std::process::abort();
}

#[test]
fn objects_of_an_interrupted_checkpoint_are_collected() {
    let (dir, store) = open();
    let mem = memory((0..100).map(|i| (i, i)));
    checkpoint(&store, "web", &stream(&mem, &mem, &[])).unwrap();
    let before = store.usage().unwrap();
    let path = store.path().to_path_buf();
    drop(store);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "tests::crash_child", "--nocapture"])
        .env("DWCP_HDE_CRASH_STORE", &path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child should have died");
    let store = PageStore::open(&path, 3).unwrap();
    let left = store.usage().unwrap();
    assert!(left.objects > before.objects, "{left:?} vs {before:?}");
    let gc = store.collect_garbage().unwrap();
    assert!(gc.objects_removed > 0);
    assert_eq!(store.usage().unwrap().objects, before.objects);
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(restored_memory(&store, "web@1").unwrap(), mem);
    // The interrupted checkpoint's id is not given out again.
    let m = checkpoint(&store, "web", &stream(&mem, &mem, &[])).unwrap();
    assert_eq!(m.id, "web@3");
    drop(dir);
}

fn replicate(
    from: &PageStore,
    to: &PageStore,
    id: &str,
    tamper: bool,
    drop_one: bool,
) -> Result<(Manifest, usize), HdeError> {
    use crate::replica::*;
    let offer = decode_offer(&encode_offer(&from.replica_offer(id)?)?)?;
    let want = decode_digests(&encode_digests(&to.missing(&offer.digests)?))?;
    let mut objects = from.read_objects(&want)?;
    if tamper {
        let (_, o) = objects
            .iter_mut()
            .find(|(_, o)| o.len() > 100)
            .expect("an object");
        let n = o.len();
        o[n - 10] ^= 1;
    }
    if drop_one {
        objects.retain(|(_, o)| o[0] != crate::codec::KIND_BLOB);
        objects.pop();
    }
    let n = want.len();
    let (m, map, objs) = decode_objects(&encode_objects(&offer.manifest, &offer.map, &objects)?)?;
    Ok((to.import_replica("alpha", m, &map, objs)?, n))
}

#[test]
fn replicas_carry_only_what_the_other_store_lacks() {
    let (_d1, a) = open();
    let (_d2, b) = open();
    let one = memory((0..200).map(|i| (i, i)));
    checkpoint(&a, "web", &stream(&one, &one, &[])).unwrap();
    let (m, sent) = replicate(&a, &b, "web@1", false, false).unwrap();
    assert_eq!(m.id, "alpha:web@1");
    assert_eq!(m.origin.as_deref(), Some("alpha"));
    assert_eq!(sent, 201 + 3);
    assert_eq!(restored_memory(&b, "alpha:web@1").unwrap(), one);

    // A small change: the second replica sends a handful of objects.
    let mut two = one.clone();
    for i in 0..5u64 {
        two.get_mut(&(i * 11)).unwrap()[200..208].copy_from_slice(b"CHANGED!");
    }
    let c = checkpoint(&a, "web", &stream(&two, &two, &[])).unwrap();
    assert_eq!(c.stats.delta_pages, 5);
    let (_, sent) = replicate(&a, &b, "web@2", false, false).unwrap();
    assert!(sent <= 5 + 3, "sent {sent} objects for 5 changed pages");
    assert_eq!(restored_memory(&b, "alpha:web@2").unwrap(), two);
    assert!(b.verify(None).unwrap().ok());
    // Offering the same again is refused: it is there already.
    assert!(matches!(
        replicate(&a, &b, "web@2", false, false),
        Err(HdeError::CheckpointExists(_))
    ));

    // A lying or incomplete sender stores nothing.
    let (_d3, c3) = open();
    let err = replicate(&a, &c3, "web@2", true, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not match") || err.contains("zstd"),
        "{err}"
    );
    let err = replicate(&a, &c3, "web@2", false, true).unwrap_err();
    assert!(
        matches!(err, HdeError::MissingPage { .. }) || err.to_string().contains("missing"),
        "{err}"
    );
    assert_eq!(c3.usage().unwrap().objects, 0);
    assert!(c3.list().unwrap().is_empty());
    // Garbage messages are errors.
    assert!(crate::replica::decode_offer(b"\0\0\0\x05{").is_err());
    assert!(crate::replica::decode_objects(&[0, 0, 0, 2, b'{', b'}', 0, 0, 0, 0, 1]).is_err());
}

/// Encodes `s` as a source would, fed in pieces of `piece` bytes: flushing
/// after each piece, or (`flush_each` false) only compressing and flushing
/// after the last.
fn wire_encode(
    enc: &mut crate::wire::WireEncoder,
    s: &[u8],
    piece: usize,
    flush_each: bool,
) -> Vec<u8> {
    let mut p = StreamParser::new();
    let mut wire = Vec::new();
    let pieces = s.len().div_ceil(piece);
    for (i, chunk) in s.chunks(piece).enumerate() {
        p.feed(chunk);
        while let Some(item) = p.next_item().unwrap() {
            let names: Vec<String> = p.blocks().iter().map(|b| b.name.clone()).collect();
            enc.encode(item, &names).unwrap();
        }
        if flush_each || i + 1 == pieces {
            enc.flush(&mut wire).unwrap();
        } else {
            enc.compress(&mut wire).unwrap();
        }
    }
    p.finish().unwrap();
    wire
}

/// Feeds `wire` to `dec` in pieces of `piece` bytes; the decoder must end
/// idle. Returns the rebuilt stream.
fn wire_decode(dec: &mut crate::wire::WireDecoder, wire: &[u8], piece: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in wire.chunks(piece) {
        dec.feed(chunk, &mut out).unwrap();
    }
    assert!(dec.is_idle());
    out
}

#[test]
fn the_wire_format_rebuilds_the_stream_and_sends_repeats_as_references() {
    use crate::wire::{WireDecoder, WireEncoder};
    let first = memory((0..200).map(|i| (i, i % 50)));
    let mut last = first.clone();
    last.insert(3, text_page(9999));
    // Page 7 changes a little: a delta against its first version.
    let mut p7 = first[&7].clone();
    p7[100..120].copy_from_slice(b"a few changed bytes!");
    last.insert(7, p7);
    let s = stream(&first, &last, &[3, 7, 9]);
    let mut enc = WireEncoder::new(3).unwrap();
    let wire = wire_encode(&mut enc, &s, 5000, true);
    let st = enc.stats();
    assert_eq!(st.stream_bytes, s.len() as u64);
    assert_eq!(st.wire_bytes, wire.len() as u64);
    // 200 pages of 50 contents: the repeats are references, page 9 (sent
    // again unchanged) too; page 7 a delta.
    assert!(st.ref_pages >= 151, "{st:?}");
    assert_eq!(st.delta_pages, 1, "{st:?}");
    assert!(st.wire_bytes * 20 < st.stream_bytes, "{st:?}");
    // The delta (20 bytes changed: three 8-byte words) saves most of its
    // page; what each way saved adds up to the stream less the wire.
    assert!((4000..4096).contains(&st.saved_by_delta), "{st:?}");
    assert_eq!(
        st.saved_by_dedup + st.saved_by_delta + st.saved_by_compression + st.wire_bytes,
        st.stream_bytes,
        "{st:?}"
    );
    let mut dec = WireDecoder::new().unwrap();
    let out = wire_decode(&mut dec, &wire, 777);
    assert_eq!(dec.record_bytes(), st.record_bytes);
    assert_eq!(out, s, "the rebuilt stream is QEMU's, byte for byte");
    // Damage anywhere is an error or a different stream, never a panic.
    for at in (0..wire.len()).step_by(wire.len() / 50 + 1) {
        let mut bad = wire.clone();
        bad[at] ^= 0x40;
        let mut dec = WireDecoder::new().unwrap();
        let mut out = Vec::new();
        let _ = bad.chunks(1000).try_for_each(|c| dec.feed(c, &mut out));
    }
}

#[test]
fn records_compressed_by_workers_without_flushes_rebuild_the_stream() {
    use crate::wire::{WireDecoder, WireEncoder};
    // 2,000 pages of text, a few MiB: several of the workers' jobs.
    let first = memory((0..2000).map(|i| (i, i)));
    let s = stream(&first, &first, &[]);
    let mut enc = WireEncoder::new(3).unwrap();
    enc.set_workers(2).unwrap();
    // Compressed without a flush after every piece but the last: what the
    // workers had done so far went out, the rest at the flush.
    let wire = wire_encode(&mut enc, &s, 100_000, false);
    let st = enc.stats();
    assert_eq!(st.wire_bytes, wire.len() as u64);
    assert!(st.wire_bytes * 2 < st.stream_bytes, "{st:?}");
    let mut dec = WireDecoder::new().unwrap();
    let out = wire_decode(&mut dec, &wire, 4096);
    assert_eq!(dec.record_bytes(), st.record_bytes);
    assert_eq!(out, s, "the rebuilt stream is QEMU's, byte for byte");
}

#[test]
fn a_preloaded_replica_leaves_only_the_changes_to_send() {
    use crate::wire::{WireDecoder, WireEncoder};
    let (_d, store) = open();
    let first = memory((0..200).map(|i| (i, i + 1000)));
    let base = checkpoint(&store, "vm", &stream(&first, &first, &[])).unwrap();
    // Since the checkpoint: pages 10..20 rewritten, 30 zeroed, 40 changed
    // a little, 50 takes 60's content; 10 dirtied again later.
    let mut last = first.clone();
    for i in 10..20 {
        last.insert(i, text_page(5000 + i));
    }
    last.remove(&30);
    let mut p40 = first[&40].clone();
    p40[9..14].copy_from_slice(b"xxxxx");
    last.insert(40, p40);
    last.insert(50, first[&60].clone());
    let mut mid = last.clone();
    mid.insert(10, text_page(7777));
    // 40 also changed a little in the first round, then again: its second
    // delta is against the checkpoint's page (the first round's version
    // of a page sent as a delta against an offered page is not kept).
    let mut p40_mid = first[&40].clone();
    p40_mid[100..104].copy_from_slice(b"yyyy");
    mid.insert(40, p40_mid);
    let s = stream(&mid, &last, &[10, 40]);

    let (_, map) = store.page_map(&base.id).unwrap();
    let slots: Vec<((u16, u64), Digest)> =
        map.nonzero_pages().map(|(b, p, d)| ((b, p), d)).collect();
    let (latest, offered) = store.latest_pages_of("vm").unwrap().unwrap();
    assert_eq!(latest.id, base.id);
    let mut enc = WireEncoder::new(3).unwrap();
    enc.receiver_has(&offered, Some(store.snapshot().unwrap()));
    enc.receiver_slots(slots.iter().copied());
    enc.offer_preload(&base.id, base.blocks.clone());
    let wire = wire_encode(&mut enc, &s, 3000, true);
    let st = enc.stats();
    assert!(enc.preloading());
    assert!(st.same_pages >= 185, "{st:?}");
    assert_eq!(st.delta_pages, 2, "{st:?}");
    assert!(st.wire_bytes < 12 * 4096, "{st:?}");

    let mut dec = WireDecoder::offering(offered.clone(), store.snapshot().ok()).unwrap();
    // QEMU's RAM starts zeroed: zero pages where nothing was preloaded
    // are left out.
    dec.zero_unless_given("pc.ram");
    let mut out = Vec::new();
    for chunk in wire.chunks(500) {
        dec.feed(chunk, &mut out).unwrap();
        if let Some(id) = dec.take_preload() {
            assert_eq!(id, base.id);
            for &((b, p), d) in &slots {
                let page = store.read_page(&d).unwrap().unwrap();
                dec.preload_page(b, p, page, &mut out).unwrap();
            }
            dec.end_preload();
            dec.feed(&[], &mut out).unwrap();
        }
    }
    assert!(dec.is_idle());
    assert_eq!(dec.record_bytes(), st.record_bytes);
    // Pages 200.. are zero then and now; 30 was not (its zero page goes).
    assert_eq!(dec.zeros_skipped(), RAM_PAGES - 200);
    assert_eq!(
        memory_of_stream(&out),
        last,
        "QEMU ends with the source's memory"
    );

    // A receiver whose QEMU maps the replica as its memory counts the
    // pages without writing them: QEMU ends with the same memory.
    let mut dec = WireDecoder::offering(offered.clone(), store.snapshot().ok()).unwrap();
    dec.zero_unless_given("pc.ram");
    let mut mapped = Vec::new();
    for chunk in wire.chunks(500) {
        dec.feed(chunk, &mut mapped).unwrap();
        if dec.take_preload().is_some() {
            for &((b, p), _) in &slots {
                dec.preload_in_place(b, p).unwrap();
            }
            dec.end_preload();
            dec.feed(&[], &mut mapped).unwrap();
        }
    }
    assert_eq!(dec.record_bytes(), st.record_bytes);
    assert!(
        mapped.len() * 4 < out.len(),
        "{} vs {}",
        mapped.len(),
        out.len()
    );
    assert_eq!(memory_after_stream(first.clone(), &mapped), last);
    // Outside a preload, or outside memory, it is refused.
    assert!(dec.preload_in_place(0, 1).is_err());

    // Without the preload, the same records are refused, not misapplied.
    let mut dec = WireDecoder::offering(Vec::new(), store.snapshot().ok()).unwrap();
    let mut out = Vec::new();
    let r = wire.chunks(500).try_for_each(|c| {
        dec.feed(c, &mut out)?;
        if dec.take_preload().is_some() {
            dec.end_preload();
            dec.feed(&[], &mut out)?;
        }
        Ok::<_, HdeError>(())
    });
    let e = r.unwrap_err().to_string();
    assert!(e.contains("said to be here already"), "{e}");
}

#[test]
fn a_footprint_lets_the_next_vm_refer_to_the_last_ones_pages() {
    use crate::wire::{WireDecoder, WireEncoder};
    // A first VM migrates: both sides keep what their codecs held.
    let first = memory((0..200).map(|i| (i, i + 300)));
    let mut enc = WireEncoder::new(3).unwrap();
    let wire = wire_encode(&mut enc, &stream(&first, &first, &[]), 4000, true);
    let mut dec = WireDecoder::new().unwrap();
    wire_decode(&mut dec, &wire, 900);
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.ram"), dir.path().join("dst.ram"));
    let length = RAM_PAGES * PAGE_SIZE as u64;
    let (held_src, held_dst) = (enc.into_held(0), dec.into_held(0));
    assert_eq!(held_src.len(), 200);
    let index = held_src.write(length, &src).unwrap();
    assert_eq!(
        held_dst.write(length, &dst).unwrap(),
        index,
        "both sides agree"
    );
    let pages = index_pages(&index);

    // A second VM from the same image: most pages the same, twenty changed
    // a little, ten new.
    let mut second = first.clone();
    for i in 0..20 {
        second.get_mut(&i).unwrap()[64..80].copy_from_slice(b"the second VM's!");
    }
    for i in 20..30 {
        second.insert(i, text_page(9000 + i));
    }
    let s = stream(&second, &second, &[]);
    let mut enc = WireEncoder::new(3).unwrap();
    enc.receiver_has(&pages, None);
    enc.receiver_likely(index.iter().map(|&(p, d)| ((0, p), d)));
    enc.bases_from(MemoryImage::from_index(&src, &index).unwrap());
    let wire = wire_encode(&mut enc, &s, 4000, true);
    let st = enc.stats();
    assert_eq!(st.ref_pages, 170, "{st:?}");
    assert_eq!(st.delta_pages, 20, "{st:?}");
    assert!(st.wire_bytes < 12 * 4096, "{st:?}");
    let mut dec = WireDecoder::offering(pages, None).unwrap();
    dec.bases_from(MemoryImage::from_index(&dst, &index).unwrap());
    assert_eq!(
        wire_decode(&mut dec, &wire, 900),
        s,
        "the rebuilt stream is QEMU's"
    );

    // A receiver without the footprint refuses the records.
    let mut dec = WireDecoder::new().unwrap();
    let mut out = Vec::new();
    let e = wire
        .chunks(900)
        .try_for_each(|c| dec.feed(c, &mut out))
        .unwrap_err();
    assert!(e.to_string().contains("offered"), "{e}");
}
