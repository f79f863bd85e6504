//! How one object is kept: a kind byte, then the payload.
//!
//! Pages are keyed by the BLAKE3 digest of their 4 KiB, whatever way they
//! are stored: raw, zstd, or as the zstd of their XOR with a base page (the
//! same page in the parent checkpoint). Blobs (the stream's non-page bytes)
//! are zstd. Deltas chain at most [`MAX_DELTA_DEPTH`] deep, so a read never
//! follows a long chain.

use dwcp_vmstream::PAGE_SIZE;

use crate::{Digest, HdeError};

pub const KIND_RAW: u8 = 0;
pub const KIND_ZSTD: u8 = 1;
pub const KIND_DELTA: u8 = 2;
pub const KIND_BLOB: u8 = 3;

/// Longest chain of deltas a page may sit at the end of.
pub const MAX_DELTA_DEPTH: u8 = 8;

/// A page is kept as a delta only when that is smaller than this share of
/// its plain compressed form (a delta costs a base read on restore).
const DELTA_WORTH: f64 = 0.8;

pub type Page = [u8; PAGE_SIZE];

/// What an object header says, without decoding the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectHead {
    Raw,
    Zstd,
    Delta { depth: u8, base: Digest },
    Blob,
}

pub fn head(bytes: &[u8]) -> Result<ObjectHead, String> {
    match bytes.first() {
        Some(&KIND_RAW) if bytes.len() == 1 + PAGE_SIZE => Ok(ObjectHead::Raw),
        Some(&KIND_ZSTD) => Ok(ObjectHead::Zstd),
        Some(&KIND_DELTA) if bytes.len() > 34 => {
            let mut base = [0u8; 32];
            base.copy_from_slice(&bytes[2..34]);
            Ok(ObjectHead::Delta {
                depth: bytes[1],
                base: Digest(base),
            })
        }
        Some(&KIND_BLOB) => Ok(ObjectHead::Blob),
        Some(k) => Err(format!("object of unknown kind {k} or wrong length")),
        None => Err("empty object".into()),
    }
}

/// Reusable compression state (a zstd context is worth keeping).
pub struct Encoder {
    cctx: zstd::bulk::Compressor<'static>,
    xor: Box<Page>,
}

/// How a page was encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Raw,
    Zstd,
    Delta,
}

impl Encoder {
    pub fn new(level: i32) -> Result<Encoder, HdeError> {
        let cctx = zstd::bulk::Compressor::new(level).map_err(HdeError::Compression)?;
        Ok(Encoder {
            cctx,
            xor: Box::new([0u8; PAGE_SIZE]),
        })
    }

    /// Encodes `page`, as a delta against `base` (digest, content and the
    /// base's own delta depth) where that is clearly smaller.
    pub fn page(
        &mut self,
        page: &Page,
        base: Option<(&Digest, &Page, u8)>,
    ) -> Result<(Vec<u8>, Encoding), HdeError> {
        let mut delta_form = None;
        if let Some((digest, base_page, depth)) = base.filter(|b| b.2 < MAX_DELTA_DEPTH) {
            for (x, (a, b)) in self.xor.iter_mut().zip(page.iter().zip(base_page.iter())) {
                *x = a ^ b;
            }
            let delta = self
                .cctx
                .compress(&self.xor[..])
                .map_err(HdeError::Compression)?;
            let mut out = Vec::with_capacity(34 + delta.len());
            out.push(KIND_DELTA);
            out.push(depth + 1);
            out.extend_from_slice(&digest.0);
            out.extend_from_slice(&delta);
            // A small change gives a tiny delta: no need to try the rest.
            if out.len() <= PAGE_SIZE / 8 {
                return Ok((out, Encoding::Delta));
            }
            delta_form = Some(out);
        }
        let plain = self.cctx.compress(page).map_err(HdeError::Compression)?;
        if let Some(d) = delta_form {
            if d.len() as f64 <= plain.len() as f64 * DELTA_WORTH {
                return Ok((d, Encoding::Delta));
            }
        }
        if plain.len() + 1 < PAGE_SIZE {
            let mut out = Vec::with_capacity(1 + plain.len());
            out.push(KIND_ZSTD);
            out.extend_from_slice(&plain);
            Ok((out, Encoding::Zstd))
        } else {
            let mut out = Vec::with_capacity(1 + PAGE_SIZE);
            out.push(KIND_RAW);
            out.extend_from_slice(page);
            Ok((out, Encoding::Raw))
        }
    }

    pub fn blob(&mut self, data: &[u8]) -> Result<Vec<u8>, HdeError> {
        let z = self.cctx.compress(data).map_err(HdeError::Compression)?;
        let mut out = Vec::with_capacity(1 + z.len());
        out.push(KIND_BLOB);
        out.extend_from_slice(&z);
        Ok(out)
    }
}

/// Decodes a page object; `base` supplies the content of a delta's base.
/// Nothing is trusted: sizes are checked, and the caller checks the digest.
pub fn decode_page(
    bytes: &[u8],
    base: impl FnOnce(&Digest) -> Result<Box<Page>, HdeError>,
) -> Result<Box<Page>, String> {
    let mut page = Box::new([0u8; PAGE_SIZE]);
    match head(bytes)? {
        ObjectHead::Raw => page.copy_from_slice(&bytes[1..]),
        ObjectHead::Zstd => unzstd_into(&bytes[1..], &mut page[..])?,
        ObjectHead::Delta { base: b, .. } => {
            unzstd_into(&bytes[34..], &mut page[..])?;
            let base_page = base(&b).map_err(|e| format!("its delta base {b}: {e}"))?;
            for (x, y) in page.iter_mut().zip(base_page.iter()) {
                *x ^= y;
            }
        }
        ObjectHead::Blob => return Err("a blob where a page was expected".into()),
    }
    Ok(page)
}

/// Decodes a blob object (at most `limit` bytes).
pub fn decode_blob(bytes: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    match head(bytes)? {
        ObjectHead::Blob => {
            zstd::bulk::decompress(&bytes[1..], limit).map_err(|e| format!("zstd: {e}"))
        }
        _ => Err("a page where a blob was expected".into()),
    }
}

thread_local! {
    /// One decompression context per thread: creating one per page cost
    /// more than decompressing the page.
    static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn unzstd_into(z: &[u8], out: &mut [u8]) -> Result<(), String> {
    let n = DCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?);
        }
        match c.as_mut() {
            Some(d) => d
                .decompress_to_buffer(z, out)
                .map_err(|e| format!("zstd: {e}")),
            None => Err("zstd: no context".to_string()),
        }
    })?;
    if n != out.len() {
        return Err(format!("decompressed to {n} bytes, not {}", out.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_page(seed: u8) -> Box<Page> {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        for (i, b) in p.iter_mut().enumerate() {
            *b = b"lorem ipsum dolor sit amet "[(i + seed as usize) % 27];
        }
        p
    }

    #[test]
    fn pages_round_trip_in_every_encoding() {
        let mut e = Encoder::new(3).unwrap();
        let base = text_page(0);
        let base_digest = Digest::of(&base[..]);
        let mut small_change = base.clone();
        small_change[1000..1008].copy_from_slice(b"CHANGED!");
        let mut random = Box::new([0u8; PAGE_SIZE]);
        let mut x = 0x9e3779b97f4a7c15u64;
        for b in random.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let random_digest = Digest::of(&random[..]);
        for (page, base, base_digest, want) in [
            (&small_change, &base, base_digest, Encoding::Delta),
            (&random, &base, base_digest, Encoding::Raw),
            (&text_page(5), &random, random_digest, Encoding::Zstd),
        ] {
            let (bytes, how) = e.page(page, Some((&base_digest, base, 0))).unwrap();
            assert_eq!(how, want);
            let back = decode_page(&bytes, |d| {
                assert_eq!(*d, base_digest);
                Ok(base.clone())
            })
            .unwrap();
            assert_eq!(&back[..], &page[..]);
        }
        // Deltas stop at the depth limit.
        let (_, how) = e
            .page(&small_change, Some((&base_digest, &base, MAX_DELTA_DEPTH)))
            .unwrap();
        assert_eq!(how, Encoding::Zstd);
    }

    #[test]
    fn garbage_objects_are_errors_not_panics() {
        for bad in [
            &b""[..],
            &[9],
            &[KIND_RAW, 1, 2],
            &[KIND_ZSTD, 1, 2, 3],
            &[KIND_DELTA; 40],
        ] {
            assert!(decode_page(bad, |_| Ok(Box::new([0u8; PAGE_SIZE]))).is_err());
        }
        assert!(decode_blob(&[KIND_BLOB, 0xff], 10).is_err());
    }
}
