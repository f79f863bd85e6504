//! What peers send a node's page store: migration records and replica
//! messages. Any bytes, in any pieces, are an error or a result, never a
//! panic.
#![no_main]

use dwcp_hde::replica::{decode_digests, decode_objects, decode_offer};
use dwcp_hde::wire::{Offer, WireDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_offer(data);
    let _ = decode_objects(data);
    let _ = decode_digests(data);
    let _ = Offer::decode(data);
    let _ = dwcp_hde::decode_index(data);
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let Ok(mut dec) = WireDecoder::new() else {
        return;
    };
    let mut out = Vec::new();
    for chunk in rest.chunks(split as usize % 97 + 1) {
        if dec.feed(chunk, &mut out).is_err() {
            return;
        }
    }
});
