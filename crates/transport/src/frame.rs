//! AMST frames and their codec (sans-IO).
//!
//! Every frame is an 8-byte header — magic `0xA4 0x57`, kind, flags, body
//! length (u32, big endian) — and a body. The decoder works on any split of
//! the byte stream, holds at most one frame, and refuses anything malformed
//! or larger than [`MAX_BODY`] with an error (the connection is then
//! closed): it never panics and never allocates more than that.

pub const MAGIC: [u8; 2] = [0xA4, 0x57];
pub const HEADER: usize = 8;
/// Largest body: a data chunk plus its header fields.
pub const MAX_BODY: usize = (1 << 20) + 64;
/// Largest data payload in one frame.
pub const MAX_CHUNK: usize = 1 << 20;

const K_HELLO: u8 = 1;
const K_HELLO_ACK: u8 = 2;
const K_OPEN: u8 = 3;
const K_DATA: u8 = 4;
const K_ACK: u8 = 5;
const K_DONE: u8 = 6;
const K_CLOSE: u8 = 7;
const K_PAD: u8 = 8;
/// Largest padding frame body.
pub const MAX_PAD: usize = 1 << 16;
const F_FIN: u8 = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// First frame of every connection: which session it belongs to.
    Hello { session: [u8; 16], conn: u16 },
    /// The server's answer; `window` is the most bytes it will hold out of
    /// order per transfer.
    HelloAck { session: [u8; 16], window: u64 },
    /// A new transfer.
    Open {
        transfer: u32,
        class: u8,
        /// Expected size, if known (for progress); 0 when not.
        size_hint: u64,
        name: String,
    },
    Data {
        transfer: u32,
        seq: u64,
        fin: bool,
        payload: Vec<u8>,
    },
    /// Every frame of `transfer` below `next_seq` was delivered in order.
    Ack { transfer: u32, next_seq: u64 },
    /// The receiver has the whole transfer: its length and BLAKE3 hash.
    Done {
        transfer: u32,
        bytes: u64,
        hash: [u8; 32],
    },
    /// The peer is closing the session (or refusing it) for this reason.
    Close { reason: String },
    /// `len` bytes of nothing, ignored by the receiver. A connection's
    /// first write after an idle spell starts with one (see
    /// `restart_pad` in `net.rs`).
    Pad { len: u32 },
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad frame magic {0:02x?} (not an AMST peer?)")]
    Magic([u8; 2]),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame body of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
}

impl Frame {
    pub fn kind_name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::HelloAck { .. } => "hello-ack",
            Frame::Open { .. } => "open",
            Frame::Data { .. } => "data",
            Frame::Ack { .. } => "ack",
            Frame::Done { .. } => "done",
            Frame::Close { .. } => "close",
            Frame::Pad { .. } => "pad",
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let (kind, flags) = match self {
            Frame::Hello { session, conn } => {
                out.extend_from_slice(session);
                out.extend_from_slice(&conn.to_be_bytes());
                (K_HELLO, 0)
            }
            Frame::HelloAck { session, window } => {
                out.extend_from_slice(session);
                out.extend_from_slice(&window.to_be_bytes());
                (K_HELLO_ACK, 0)
            }
            Frame::Open {
                transfer,
                class,
                size_hint,
                name,
            } => {
                out.extend_from_slice(&transfer.to_be_bytes());
                out.push(*class);
                out.extend_from_slice(&size_hint.to_be_bytes());
                let n = truncate_utf8(name, 255).as_bytes();
                out.push(n.len() as u8);
                out.extend_from_slice(n);
                (K_OPEN, 0)
            }
            Frame::Data {
                transfer,
                seq,
                fin,
                payload,
            } => {
                out.extend_from_slice(&transfer.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(payload);
                (K_DATA, if *fin { F_FIN } else { 0 })
            }
            Frame::Ack { transfer, next_seq } => {
                out.extend_from_slice(&transfer.to_be_bytes());
                out.extend_from_slice(&next_seq.to_be_bytes());
                (K_ACK, 0)
            }
            Frame::Done {
                transfer,
                bytes,
                hash,
            } => {
                out.extend_from_slice(&transfer.to_be_bytes());
                out.extend_from_slice(&bytes.to_be_bytes());
                out.extend_from_slice(hash);
                (K_DONE, 0)
            }
            Frame::Close { reason } => {
                let r = truncate_utf8(reason, 1024).as_bytes();
                out.extend_from_slice(r);
                (K_CLOSE, 0)
            }
            Frame::Pad { len } => {
                out.resize(out.len() + (*len as usize).min(MAX_PAD), 0);
                (K_PAD, 0)
            }
        };
        let body = (out.len() - start - HEADER) as u32;
        out[start + 2] = kind;
        out[start + 3] = flags;
        out[start + 4..start + 8].copy_from_slice(&body.to_be_bytes());
    }

    fn decode_body(kind: u8, flags: u8, b: &[u8]) -> Result<Frame, FrameError> {
        let u32_at = |i: usize| -> Option<u32> {
            b.get(i..i + 4)
                .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        };
        let u64_at = |i: usize| -> Option<u64> {
            b.get(i..i + 8).map(|s| {
                let mut a = [0u8; 8];
                a.copy_from_slice(s);
                u64::from_be_bytes(a)
            })
        };
        let arr16 =
            |i: usize| -> Option<[u8; 16]> { b.get(i..i + 16).and_then(|s| s.try_into().ok()) };
        match kind {
            K_HELLO => {
                if b.len() != 18 {
                    return Err(FrameError::Malformed("hello"));
                }
                let session = arr16(0).ok_or(FrameError::Malformed("hello"))?;
                Ok(Frame::Hello {
                    session,
                    conn: u16::from_be_bytes([b[16], b[17]]),
                })
            }
            K_HELLO_ACK => {
                if b.len() != 24 {
                    return Err(FrameError::Malformed("hello-ack"));
                }
                Ok(Frame::HelloAck {
                    session: arr16(0).ok_or(FrameError::Malformed("hello-ack"))?,
                    window: u64_at(16).ok_or(FrameError::Malformed("hello-ack"))?,
                })
            }
            K_OPEN => {
                let bad = FrameError::Malformed("open");
                let transfer = u32_at(0).ok_or(bad.clone())?;
                let class = *b.get(4).ok_or(bad.clone())?;
                let size_hint = u64_at(5).ok_or(bad.clone())?;
                let n = *b.get(13).ok_or(bad.clone())? as usize;
                if b.len() != 14 + n {
                    return Err(bad);
                }
                let name = String::from_utf8(b[14..].to_vec()).map_err(|_| bad)?;
                Ok(Frame::Open {
                    transfer,
                    class,
                    size_hint,
                    name,
                })
            }
            K_DATA => {
                let bad = FrameError::Malformed("data");
                let transfer = u32_at(0).ok_or(bad.clone())?;
                let seq = u64_at(4).ok_or(bad.clone())?;
                let payload = b[12..].to_vec();
                if payload.len() > MAX_CHUNK {
                    return Err(bad);
                }
                Ok(Frame::Data {
                    transfer,
                    seq,
                    fin: flags & F_FIN != 0,
                    payload,
                })
            }
            K_ACK => {
                if b.len() != 12 {
                    return Err(FrameError::Malformed("ack"));
                }
                Ok(Frame::Ack {
                    transfer: u32_at(0).ok_or(FrameError::Malformed("ack"))?,
                    next_seq: u64_at(4).ok_or(FrameError::Malformed("ack"))?,
                })
            }
            K_DONE => {
                if b.len() != 44 {
                    return Err(FrameError::Malformed("done"));
                }
                let mut hash = [0u8; 32];
                hash.copy_from_slice(&b[12..44]);
                Ok(Frame::Done {
                    transfer: u32_at(0).ok_or(FrameError::Malformed("done"))?,
                    bytes: u64_at(4).ok_or(FrameError::Malformed("done"))?,
                    hash,
                })
            }
            K_CLOSE => {
                if b.len() > 1024 {
                    return Err(FrameError::Malformed("close"));
                }
                Ok(Frame::Close {
                    reason: String::from_utf8(b.to_vec())
                        .map_err(|_| FrameError::Malformed("close"))?,
                })
            }
            K_PAD => {
                if b.len() > MAX_PAD {
                    return Err(FrameError::Malformed("pad"));
                }
                Ok(Frame::Pad {
                    len: b.len() as u32,
                })
            }
            other => Err(FrameError::Kind(other)),
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Incremental decoder: feed bytes with [`Decoder::push`], take frames with
/// [`Decoder::next_frame`].
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that do not yet make a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER {
            self.compact();
            return Ok(None);
        }
        if avail[..2] != MAGIC {
            return Err(FrameError::Magic([avail[0], avail[1]]));
        }
        let len = u32::from_be_bytes([avail[4], avail[5], avail[6], avail[7]]) as usize;
        if len > MAX_BODY {
            return Err(FrameError::TooLarge(len));
        }
        if avail.len() < HEADER + len {
            self.compact();
            return Ok(None);
        }
        let frame = Frame::decode_body(avail[2], avail[3], &avail[HEADER..HEADER + len])?;
        self.start += HEADER + len;
        Ok(Some(frame))
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kinds() -> Vec<Frame> {
        vec![
            Frame::Hello {
                session: [7; 16],
                conn: 3,
            },
            Frame::HelloAck {
                session: [1; 16],
                window: 1 << 26,
            },
            Frame::Open {
                transfer: 9,
                class: 2,
                size_hint: 12345,
                name: "disk.img".into(),
            },
            Frame::Data {
                transfer: 9,
                seq: 77,
                fin: true,
                payload: (0..=255).collect(),
            },
            Frame::Ack {
                transfer: 9,
                next_seq: 78,
            },
            Frame::Done {
                transfer: 9,
                bytes: 99,
                hash: [5; 32],
            },
            Frame::Close {
                reason: "bye".into(),
            },
            Frame::Pad { len: 3000 },
        ]
    }

    #[test]
    fn round_trip_in_any_split() {
        let frames = all_kinds();
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        for step in [1, 3, 7, 64, wire.len()] {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                d.push(chunk);
                while let Some(f) = d.next_frame().expect("valid") {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "split {step}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn long_names_are_cut_on_character_boundaries() {
        let f = Frame::Open {
            transfer: 1,
            class: 1,
            size_hint: 0,
            name: "é".repeat(200),
        };
        let mut wire = Vec::new();
        f.encode(&mut wire);
        let mut d = Decoder::new();
        d.push(&wire);
        match d.next_frame() {
            Ok(Some(Frame::Open { name, .. })) => assert_eq!(name, "é".repeat(127)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let mut d = Decoder::new();
        d.push(b"GET / HTTP/1.1\r\n");
        assert!(matches!(d.next_frame(), Err(FrameError::Magic(_))));
        let mut d = Decoder::new();
        d.push(&[0xA4, 0x57, K_DATA, 0, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge(_))));
        let mut d = Decoder::new();
        d.push(&[0xA4, 0x57, 99, 0, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::Kind(99)));
        let mut d = Decoder::new();
        d.push(&[0xA4, 0x57, K_ACK, 0, 0, 0, 0, 3, 1, 2, 3]);
        assert_eq!(d.next_frame(), Err(FrameError::Malformed("ack")));
        let mut d = Decoder::new();
        d.push(&[
            0xA4, 0x57, K_OPEN, 0, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9,
        ]);
        assert_eq!(d.next_frame(), Err(FrameError::Malformed("open")));
        let mut d = Decoder::new();
        let mut pad = vec![0xA4, 0x57, K_PAD, 0];
        pad.extend_from_slice(&(MAX_PAD as u32 + 1).to_be_bytes());
        pad.resize(HEADER + MAX_PAD + 1, 0);
        d.push(&pad);
        assert_eq!(d.next_frame(), Err(FrameError::Malformed("pad")));
    }

    #[test]
    fn pseudo_random_bytes_never_panic() {
        let mut x: u64 = 0x1234_5678;
        for _ in 0..2000 {
            let mut d = Decoder::new();
            let mut bytes = vec![0xA4, 0x57];
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            bytes[2] %= 10;
            d.push(&bytes);
            for _ in 0..4 {
                if !matches!(d.next_frame(), Ok(Some(_))) {
                    break;
                }
            }
        }
    }
}
