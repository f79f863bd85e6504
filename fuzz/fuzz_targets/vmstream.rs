//! Any bytes, fed in pieces whose sizes the input chooses, never panic the
//! parser, and whatever it hands out rebuilds into exactly the bytes it
//! consumed.
#![no_main]

use dwcp_vmstream::{StreamParser, StreamWriter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let piece = (split as usize % 64) + 1;
    let mut parser = StreamParser::new();
    let mut writer = StreamWriter::new();
    let mut out = Vec::new();
    for chunk in stream.chunks(piece) {
        parser.feed(chunk);
        loop {
            match parser.next_item() {
                Ok(Some(item)) => writer.write(&item, &mut out).expect("parsed items rebuild"),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = parser.finish();
    assert_eq!(&out[..], &stream[..parser.consumed_bytes() as usize]);
});
