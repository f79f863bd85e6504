//! The AMST frame decoder and the receiver core on arbitrary bytes: never a
//! panic, never unbounded memory; whatever decodes re-encodes to the same
//! bytes.
#![no_main]

use dwcp_transport::frame::{Decoder, Frame};
use dwcp_transport::sched::Receiver;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Split the input at an input-chosen point to exercise partial reads.
    let cut = data.first().map(|&b| b as usize % (data.len().max(1))).unwrap_or(0);
    let mut d = Decoder::new();
    let mut r = Receiver::new(1 << 20);
    d.push(&data[..cut]);
    d.push(&data[cut..]);
    while let Ok(Some(f)) = d.next_frame() {
        let mut again = Vec::new();
        f.encode(&mut again);
        let mut d2 = Decoder::new();
        d2.push(&again);
        assert_eq!(d2.next_frame().ok().flatten().as_ref(), Some(&f));
        match f {
            Frame::Open { transfer, class, size_hint, name } => {
                let _ = r.handle_open(transfer, class, &name, size_hint);
            }
            Frame::Data { transfer, seq, fin, payload } => {
                let _ = r.handle_data(transfer, seq, fin, payload);
            }
            _ => {}
        }
        assert!(d.buffered() <= data.len());
    }
});
