use super::*;
use proptest::prelude::*;

/// A small stream shaped like QEMU 10's: header, configuration, START with
/// two blocks, a PART with pages, a command, END, device state and the VM
/// description.
fn sample_stream(pages: &[(usize, u64, bool, PageData)]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&MAGIC.to_be_bytes());
    s.extend_from_slice(&VERSION.to_be_bytes());
    s.push(SEC_CONFIGURATION);
    s.extend_from_slice(&11u32.to_be_bytes());
    s.extend_from_slice(b"pc-q35-10.0");
    s.push(SEC_START);
    s.extend_from_slice(&1u32.to_be_bytes());
    s.push(3);
    s.extend_from_slice(b"ram");
    s.extend_from_slice(&0u32.to_be_bytes());
    s.extend_from_slice(&4u32.to_be_bytes());
    let blocks = [
        ("pc.ram", 64 * PAGE_SIZE as u64),
        ("pc.bios", 4 * PAGE_SIZE as u64),
    ];
    let total: u64 = blocks.iter().map(|b| b.1).sum();
    s.extend_from_slice(&(total | FLAG_MEM_SIZE).to_be_bytes());
    for (name, len) in blocks {
        s.push(name.len() as u8);
        s.extend_from_slice(name.as_bytes());
        s.extend_from_slice(&len.to_be_bytes());
    }
    s.extend_from_slice(&ram_section_end(1));
    s.extend_from_slice(&ram_section_header(SectionKind::Part, 1));
    let names = ["pc.ram", "pc.bios"];
    for (block, offset, named, data) in pages {
        write_page(&mut s, *offset, named.then_some(names[*block]), data);
    }
    s.extend_from_slice(&ram_section_end(1));
    s.extend_from_slice(&[SEC_COMMAND, 0, 11, 0, 0]);
    s.extend_from_slice(&ram_section_header(SectionKind::End, 1));
    s.extend_from_slice(&ram_section_end(1));
    s.push(SEC_FULL);
    s.extend_from_slice(&2u32.to_be_bytes());
    s.push(5);
    s.extend_from_slice(b"timer");
    s.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 2, 1, 2, 3, SEC_FOOTER, 0, 0, 0, 2]);
    s.push(SEC_EOF);
    let json = br#"{"page_size": 4096, "devices": []}"#;
    s.push(SEC_VMDESCRIPTION);
    s.extend_from_slice(&(json.len() as u32).to_be_bytes());
    s.extend_from_slice(json);
    s
}

fn page(fill: u8) -> PageData {
    PageData::Full(Box::new([fill; PAGE_SIZE]))
}

fn default_pages() -> Vec<(usize, u64, bool, PageData)> {
    vec![
        (0, 0, true, page(7)),
        (0, 4096, false, PageData::Fill(0)),
        (1, 0, true, page(9)),
        (0, 63 * 4096, true, page(1)),
    ]
}

/// Parses `stream` fed in pieces of the given sizes (cycled).
fn parse_in_pieces(
    stream: &[u8],
    pieces: &[usize],
) -> Result<(Vec<Item>, StreamParser), StreamError> {
    let mut p = StreamParser::new();
    let mut items = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let n = pieces[i % pieces.len()].max(1).min(stream.len() - at);
        p.feed(&stream[at..at + n]);
        at += n;
        i += 1;
        while let Some(item) = p.next_item()? {
            items.push(item);
        }
    }
    Ok((items, p))
}

fn rebuild(items: &[Item]) -> Vec<u8> {
    let mut w = StreamWriter::new();
    let mut out = Vec::new();
    for item in items {
        w.write(item, &mut out).unwrap();
    }
    out
}

#[test]
fn parses_pages_and_rebuilds_the_exact_bytes() {
    let s = sample_stream(&default_pages());
    let (items, p) = parse_in_pieces(&s, &[s.len()]).unwrap();
    p.finish().unwrap();
    assert_eq!(rebuild(&items), s);
    let pages: Vec<&PageRecord> = items
        .iter()
        .filter_map(|i| match i {
            Item::Page(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(pages.len(), 4);
    assert_eq!(
        (pages[1].block, pages[1].offset, pages[1].named),
        (0, 4096, false)
    );
    assert_eq!(pages[2].block, 1);
    assert_eq!(p.blocks().len(), 2);
    assert_eq!(p.ram_section_id(), Some(1));
    assert!(p.ram_complete());
    assert!(p.opaque_reason().is_none());
    assert!(items.contains(&Item::Meta {
        kind: MetaKind::Command(11),
        bytes: vec![SEC_COMMAND, 0, 11, 0, 0]
    }));
}

#[test]
fn byte_at_a_time_gives_the_same_items() {
    let s = sample_stream(&default_pages());
    let (whole, _) = parse_in_pieces(&s, &[s.len()]).unwrap();
    let (bytewise, p) = parse_in_pieces(&s, &[1]).unwrap();
    p.finish().unwrap();
    // Tail pieces differ in size; compare the rebuilt bytes and the pages.
    assert_eq!(rebuild(&bytewise), s);
    let count = |v: &[Item]| v.iter().filter(|i| matches!(i, Item::Page(_))).count();
    assert_eq!(count(&whole), count(&bytewise));
}

#[test]
fn every_truncation_is_reported() {
    let s = sample_stream(&default_pages());
    for cut in 0..s.len() {
        let (items, p) = parse_in_pieces(&s[..cut], &[97]).unwrap();
        let err = p.finish().unwrap_err();
        assert!(
            matches!(err, StreamError::Truncated { .. }),
            "cut {cut}: {err}"
        );
        // What was handed out is a prefix of the stream.
        assert_eq!(rebuild(&items), s[..p.consumed_bytes() as usize]);
    }
}

#[test]
fn never_waits_for_bytes_not_yet_sent() {
    // Everything up to the end of a record is handed out without more input.
    let s = sample_stream(&default_pages());
    let mut p = StreamParser::new();
    p.feed(&s);
    let mut n = 0;
    while p.next_item().unwrap().is_some() {
        n += 1;
    }
    assert_eq!(p.consumed_bytes(), s.len() as u64);
    assert!(n > 8);
}

#[test]
fn wrong_magic_version_and_features_are_refused_clearly() {
    let mut p = StreamParser::new();
    p.feed(b"GIF89a..");
    assert!(matches!(p.next_item(), Err(StreamError::BadMagic { .. })));

    let mut s = sample_stream(&[]);
    s[7] = 4;
    let mut p = StreamParser::new();
    p.feed(&s);
    assert!(matches!(
        p.next_item(),
        Err(StreamError::BadVersion { version: 4, .. })
    ));

    // An xbzrle page where a plain one should be.
    let s = sample_stream(&default_pages());
    let at = find_first_page(&s);
    let mut bad = s.clone();
    bad[at + 7] = 0x40;
    let err = parse_in_pieces(&bad, &[bad.len()]).unwrap_err();
    assert!(err.to_string().contains("xbzrle"), "{err}");
    let mut bad = s;
    bad[at + 7] = 0x08 | 0x02;
    let err = parse_in_pieces(&bad, &[bad.len()]).unwrap_err();
    assert!(matches!(err, StreamError::Unsupported { .. }), "{err}");
}

#[test]
fn unknown_blocks_and_offsets_beyond_a_block_are_malformed() {
    let s = sample_stream(&[(0, 64 * 4096, true, page(1))]);
    let err = parse_in_pieces(&s, &[4096]).unwrap_err();
    assert!(err.to_string().contains("beyond the end"), "{err}");

    let s = sample_stream(&[(0, 0, false, page(1))]);
    let err = parse_in_pieces(&s, &[4096]).unwrap_err();
    assert!(err.to_string().contains("CONTINUE"), "{err}");

    let mut s = sample_stream(&default_pages());
    let at = find_first_page(&s);
    s[at + 9] = b'X'; // "pc.ram" -> "Xc.ram"
    let err = parse_in_pieces(&s, &[4096]).unwrap_err();
    assert!(err.to_string().contains("unknown RAM block"), "{err}");
}

#[test]
fn a_section_it_does_not_know_turns_the_rest_into_tail() {
    let mut s = sample_stream(&[]);
    // Replace the START "ram" section name with "dirty-bitmap"-like "blk".
    let at = s.windows(3).position(|w| w == b"ram").unwrap();
    s[at..at + 3].copy_from_slice(b"blk");
    let (items, p) = parse_in_pieces(&s, &[50]).unwrap();
    assert_eq!(p.opaque_reason(), Some("blk"));
    assert!(!p.ram_complete());
    assert_eq!(rebuild(&items), s);
}

#[test]
fn tail_completeness() {
    assert!(tail_is_complete(&[0]));
    let mut t = vec![4, 1, 2, 0x7e, 0, 0, 0, 1, 0, 6];
    t.extend_from_slice(&(4u32).to_be_bytes());
    t.extend_from_slice(b"{{}}");
    assert!(tail_is_complete(&t));
    assert!(!tail_is_complete(&t[..t.len() - 1]));
    assert!(!tail_is_complete(b"}"));
    assert!(!tail_is_complete(&[]));
}

fn find_first_page(s: &[u8]) -> usize {
    // The first record after the PART header: `02 00000001`.
    let part = s
        .windows(5)
        .position(|w| w == [SEC_PART, 0, 0, 0, 1])
        .unwrap();
    part + 5
}

fn arb_page() -> impl Strategy<Value = (usize, u64, bool, PageData)> {
    (
        0usize..2,
        0u64..4,
        any::<bool>(),
        prop_oneof![
            any::<u8>().prop_map(PageData::Fill),
            (any::<u8>(), any::<u8>()).prop_map(|(a, b)| {
                let mut p = Box::new([a; PAGE_SIZE]);
                p[100] = b;
                PageData::Full(p)
            }),
        ],
    )
        .prop_map(|(block, page_index, cont, data)| (block, page_index * 4096, cont, data))
}

proptest! {
    #[test]
    fn any_page_sequence_round_trips_in_any_pieces(
        raw_pages in proptest::collection::vec(arb_page(), 0..24),
        pieces in proptest::collection::vec(1usize..6000, 1..8),
    ) {
        // CONTINUE is only valid after a page of the same block.
        let mut pages = Vec::new();
        let mut last: Option<usize> = None;
        for (block, offset, cont, data) in raw_pages {
            let named = !(cont && last == Some(block));
            pages.push((block, offset, named, data));
            last = Some(block);
        }
        let s = sample_stream(&pages);
        let (items, p) = parse_in_pieces(&s, &pieces).unwrap();
        p.finish().unwrap();
        prop_assert_eq!(rebuild(&items), s);
        let got: Vec<(usize, u64, bool, PageData)> = items.into_iter().filter_map(|i| match i {
            Item::Page(r) => Some((r.block as usize, r.offset, r.named, r.data)),
            _ => None,
        }).collect();
        prop_assert_eq!(got, pages);
    }

    #[test]
    fn corrupted_streams_never_panic(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        pieces in proptest::collection::vec(1usize..5000, 1..4),
    ) {
        let mut s = sample_stream(&default_pages());
        for (at, v) in flips {
            let n = s.len();
            s[at % n] = v;
        }
        if let Ok((items, p)) = parse_in_pieces(&s, &pieces) {
            let _ = p.finish();
            let out = rebuild(&items);
            prop_assert_eq!(&out[..], &s[..p.consumed_bytes() as usize]);
        }
    }
}
