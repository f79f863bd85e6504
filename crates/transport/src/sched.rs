//! The sans-IO core of an AMST session: which frame goes out next on which
//! connection, what is still unacknowledged, and in-order delivery with
//! bounded reordering on the receiving side. No sockets, no clocks (time is
//! passed in as `now`, in ns), deterministic.
//!
//! Sender ([`Sender`]):
//! - inputs: `open`, `push` (a chunk of a transfer, refused when its window
//!   is full: backpressure), `handle_ack`, `handle_done`, `conn_up`,
//!   `conn_lost`, `set_class`;
//! - outputs: `poll_transmit(conn, now)` (the next frame for a connection
//!   that has room), `poll_timeout` (when a rate-limited class may send).
//!
//! Receiver ([`Receiver`]): `handle_open`, `handle_data` → chunks to deliver
//! in order, the cumulative ack, and `Done` once the last chunk is in.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::frame::Frame;

/// Traffic classes, in strict priority for `Control`, weighted for the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Control = 0,
    Migration = 1,
    Replication = 2,
    Background = 3,
}

impl Class {
    pub const ALL: [Class; 4] = [
        Class::Control,
        Class::Migration,
        Class::Replication,
        Class::Background,
    ];

    pub fn from_u8(v: u8) -> Option<Class> {
        Class::ALL.get(v as usize).copied()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Control => "control",
            Class::Migration => "migration",
            Class::Replication => "replication",
            Class::Background => "background",
        }
    }
}

impl std::str::FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Class::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("{s:?}: expected control, migration, replication or background"))
    }
}

/// Weight and rate limit of a class (control ignores the weight: it always
/// goes first).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassConfig {
    pub weight: u32,
    /// Bytes per second; `None` is unlimited.
    pub rate_limit: Option<u64>,
}

pub fn default_classes() -> [ClassConfig; 4] {
    [
        ClassConfig {
            weight: 1,
            rate_limit: None,
        },
        ClassConfig {
            weight: 8,
            rate_limit: None,
        },
        ClassConfig {
            weight: 4,
            rate_limit: None,
        },
        ClassConfig {
            weight: 1,
            rate_limit: None,
        },
    ]
}

/// A rate-limited class may run this far ahead (bytes).
const BURST_BYTES: f64 = 256.0 * 1024.0;

struct ClassState {
    cfg: ClassConfig,
    /// Bytes sent, divided by weight when compared: fair queueing.
    served: f64,
    tokens: f64,
    refilled_at: u64,
    order: VecDeque<u32>,
}

struct Slot {
    payload: Vec<u8>,
    fin: bool,
    /// The connection it last went out on, and when (ns).
    sent: Option<(u16, u64)>,
    /// Already sent a second time because it was late.
    hedged: bool,
    /// The connection it first went out on.
    first_conn: Option<u16>,
}

struct Out {
    class: Class,
    /// Unacknowledged frames (sent or not).
    frames: BTreeMap<u64, Slot>,
    next_unsent: u64,
    next_seq: u64,
    acked: u64,
    unacked_bytes: u64,
    /// Bytes pushed and never sent yet.
    unsent_bytes: u64,
    hasher: blake3::Hasher,
    pushed_bytes: u64,
    fin_pushed: bool,
    /// The receiver acknowledged the Open: data may flow on any
    /// connection.
    confirmed: bool,
    /// The connection the Open went out on: until it is acknowledged, data
    /// goes there only (behind the Open, in order), so a request does not
    /// wait a round trip for its Open's acknowledgement.
    open_on: Option<u16>,
    name: String,
    size_hint: u64,
}

/// What a sender knows of one transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutStatus {
    pub pushed_bytes: u64,
    pub unacked_bytes: u64,
    pub acked_frames: u64,
    pub complete: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SenderStats {
    pub frames_sent: u64,
    pub frames_retransmitted: u64,
    pub bytes_sent: u64,
    pub bytes_acked: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    #[error("transfer {0} is not open")]
    Unknown(u32),
    #[error("transfer {0} already exists")]
    Exists(u32),
    #[error("transfer {0} is already finished")]
    Finished(u32),
    #[error("chunk of {0} bytes is larger than a frame may carry")]
    ChunkTooLarge(usize),
    #[error("peer acknowledged frame {got} of transfer {transfer}, which was never sent (next is {next})")]
    BadAck { transfer: u32, got: u64, next: u64 },
}

pub struct Sender {
    window: u64,
    max_unsent: u64,
    transfers: BTreeMap<u32, Out>,
    classes: Vec<ClassState>,
    control: VecDeque<Frame>,
    inflight: BTreeMap<u16, VecDeque<(u32, u64)>>,
    retransmit: VecDeque<(u32, u64)>,
    stats: SenderStats,
    hedge_after: Option<u64>,
}

/// How many of a transfer's oldest unacknowledged frames may be hedged.
const HEDGE_DEPTH: usize = 8;

impl Sender {
    /// `window`: most unacknowledged bytes per transfer (the receiver's
    /// reorder limit).
    pub fn new(window: u64) -> Sender {
        Sender {
            window: window.max(crate::frame::MAX_CHUNK as u64),
            max_unsent: u64::MAX,
            transfers: BTreeMap::new(),
            classes: default_classes()
                .into_iter()
                .map(|cfg| ClassState {
                    cfg,
                    served: 0.0,
                    tokens: BURST_BYTES,
                    refilled_at: 0,
                    order: VecDeque::new(),
                })
                .collect(),
            control: VecDeque::new(),
            inflight: BTreeMap::new(),
            retransmit: VecDeque::new(),
            stats: SenderStats::default(),
            hedge_after: None,
        }
    }

    pub fn set_window(&mut self, window: u64) {
        self.window = window.max(crate::frame::MAX_CHUNK as u64);
    }

    /// Most bytes of a transfer waiting here for a connection: a push
    /// beyond it is refused like one beyond the window, so a source that
    /// could run ahead of the link waits instead of queueing here.
    pub fn set_max_unsent(&mut self, bytes: u64) {
        self.max_unsent = bytes.max(crate::frame::MAX_CHUNK as u64);
    }

    pub fn stats(&self) -> SenderStats {
        self.stats
    }

    pub fn set_class(&mut self, class: Class, cfg: ClassConfig) {
        let c = &mut self.classes[class as usize];
        c.cfg = ClassConfig {
            weight: cfg.weight.max(1),
            rate_limit: cfg.rate_limit,
        };
        c.tokens = c.tokens.min(BURST_BYTES);
    }

    pub fn class_config(&self, class: Class) -> ClassConfig {
        self.classes[class as usize].cfg
    }

    pub fn open(
        &mut self,
        transfer: u32,
        class: Class,
        name: &str,
        size_hint: u64,
    ) -> Result<(), SendError> {
        if self.transfers.contains_key(&transfer) {
            return Err(SendError::Exists(transfer));
        }
        self.transfers.insert(
            transfer,
            Out {
                class,
                frames: BTreeMap::new(),
                next_unsent: 0,
                next_seq: 0,
                acked: 0,
                unacked_bytes: 0,
                unsent_bytes: 0,
                hasher: blake3::Hasher::new(),
                pushed_bytes: 0,
                fin_pushed: false,
                confirmed: false,
                open_on: None,
                name: name.to_owned(),
                size_hint,
            },
        );
        // A class just becoming busy starts level with the busiest, so an
        // idle spell earns it no burst.
        let level = self
            .classes
            .iter()
            .filter(|c| !c.order.is_empty())
            .map(|c| c.served / c.cfg.weight as f64)
            .fold(0.0, f64::max);
        let cs = &mut self.classes[class as usize];
        if cs.order.is_empty() {
            cs.served = cs.served.max(level * cs.cfg.weight as f64);
        }
        cs.order.push_back(transfer);
        self.control.push_back(Frame::Open {
            transfer,
            class: class as u8,
            size_hint,
            name: name.to_owned(),
        });
        Ok(())
    }

    /// Whether `bytes` more would fit in the transfer's window now.
    pub fn has_room(&self, transfer: u32, bytes: usize) -> bool {
        self.transfers
            .get(&transfer)
            .is_some_and(|t| self.fits(t, bytes as u64))
    }

    fn fits(&self, t: &Out, bytes: u64) -> bool {
        (t.unacked_bytes == 0 || t.unacked_bytes + bytes <= self.window)
            && (t.unsent_bytes == 0 || t.unsent_bytes + bytes <= self.max_unsent)
    }

    /// Adds the next chunk of a transfer (`fin` on the last). Returns
    /// `Ok(false)` when the window is full: try again after an ack.
    pub fn push(&mut self, transfer: u32, chunk: Vec<u8>, fin: bool) -> Result<bool, SendError> {
        if chunk.len() > crate::frame::MAX_CHUNK {
            return Err(SendError::ChunkTooLarge(chunk.len()));
        }
        let t = self
            .transfers
            .get(&transfer)
            .ok_or(SendError::Unknown(transfer))?;
        if t.fin_pushed {
            return Err(SendError::Finished(transfer));
        }
        if !self.fits(t, chunk.len() as u64) {
            return Ok(false);
        }
        let Some(t) = self.transfers.get_mut(&transfer) else {
            return Err(SendError::Unknown(transfer));
        };
        t.hasher.update(&chunk);
        t.pushed_bytes += chunk.len() as u64;
        t.unacked_bytes += chunk.len() as u64;
        t.unsent_bytes += chunk.len() as u64;
        t.fin_pushed = fin;
        t.frames.insert(
            t.next_seq,
            Slot {
                payload: chunk,
                fin,
                sent: None,
                hedged: false,
                first_conn: None,
            },
        );
        t.next_seq += 1;
        Ok(true)
    }

    /// The BLAKE3 hash and length of everything pushed (final once the
    /// last chunk was pushed).
    pub fn digest(&self, transfer: u32) -> Option<([u8; 32], u64)> {
        self.transfers
            .get(&transfer)
            .map(|t| (*t.hasher.finalize().as_bytes(), t.pushed_bytes))
    }

    pub fn status(&self, transfer: u32) -> Option<OutStatus> {
        self.transfers.get(&transfer).map(|t| OutStatus {
            pushed_bytes: t.pushed_bytes,
            unacked_bytes: t.unacked_bytes,
            acked_frames: t.acked,
            complete: t.fin_pushed && t.frames.is_empty(),
        })
    }

    /// Forgets a finished (or abandoned) transfer.
    pub fn close(&mut self, transfer: u32) {
        if let Some(t) = self.transfers.remove(&transfer) {
            self.classes[t.class as usize]
                .order
                .retain(|&x| x != transfer);
        }
    }

    pub fn conn_up(&mut self, conn: u16) {
        self.inflight.entry(conn).or_default();
    }

    /// A connection died: what it carried and was not acknowledged goes out
    /// again on the others.
    pub fn conn_lost(&mut self, conn: u16) {
        // A transfer whose Open went on this connection unacknowledged
        // starts over: its Open goes again (below), its data behind it.
        for t in self.transfers.values_mut() {
            if !t.confirmed && t.open_on == Some(conn) {
                t.open_on = None;
                let first = t.frames.keys().next().copied().unwrap_or(t.next_seq);
                for (_, slot) in t.frames.range_mut(first..t.next_unsent) {
                    slot.sent = None;
                    t.unsent_bytes += slot.payload.len() as u64;
                }
                t.next_unsent = first;
            }
        }
        if let Some(q) = self.inflight.remove(&conn) {
            for (t, s) in q {
                if self
                    .transfers
                    .get(&t)
                    .is_some_and(|o| o.confirmed && o.frames.contains_key(&s))
                {
                    self.retransmit.push_back((t, s));
                }
            }
        }
        // An Open that may have died with the connection goes out again
        // (the receiver ignores a repeated Open, and acks it).
        for (&id, t) in &self.transfers {
            let queued = self
                .control
                .iter()
                .any(|f| matches!(f, Frame::Open { transfer, .. } if *transfer == id));
            if !t.confirmed && !queued {
                self.control.push_back(Frame::Open {
                    transfer: id,
                    class: t.class as u8,
                    size_hint: t.size_hint,
                    name: t.name.clone(),
                });
            }
        }
    }

    /// Whether `conn` carries frames that are not acknowledged yet.
    pub fn conn_has_unacked(&self, conn: u16) -> bool {
        self.inflight.get(&conn).is_some_and(|q| {
            q.iter().any(|(t, s)| {
                self.transfers
                    .get(t)
                    .is_some_and(|o| o.frames.contains_key(s))
            })
        })
    }

    /// Whether `conn` carries a frame it sent more than `age` ns before
    /// `now` that is still not acknowledged (the connection's silence alone
    /// says nothing when it was idle until a moment ago).
    pub fn conn_unacked_since(&self, conn: u16, now: u64, age: u64) -> bool {
        self.inflight.get(&conn).is_some_and(|q| {
            q.iter().any(|(t, s)| {
                self.transfers
                    .get(t)
                    .and_then(|o| o.frames.get(s))
                    .and_then(|slot| slot.sent)
                    .is_some_and(|(c, at)| c == conn && now.saturating_sub(at) > age)
            })
        })
    }

    pub fn conns(&self) -> usize {
        self.inflight.len()
    }

    pub fn handle_ack(&mut self, transfer: u32, next_seq: u64) -> Result<u64, SendError> {
        let Some(t) = self.transfers.get_mut(&transfer) else {
            return Ok(0); // a late ack for a closed transfer
        };
        if next_seq > t.next_unsent {
            return Err(SendError::BadAck {
                transfer,
                got: next_seq,
                next: t.next_seq,
            });
        }
        let mut freed = 0;
        while let Some((&s, _)) = t.frames.first_key_value() {
            if s >= next_seq {
                break;
            }
            if let Some(slot) = t.frames.remove(&s) {
                freed += slot.payload.len() as u64;
            }
        }
        t.confirmed = true;
        t.acked = t.acked.max(next_seq);
        t.next_unsent = t.next_unsent.max(t.acked);
        t.unacked_bytes -= freed;
        self.stats.bytes_acked += freed;
        for q in self.inflight.values_mut() {
            if q.len() > 4096 {
                let transfers = &self.transfers;
                q.retain(|(t, s)| transfers.get(t).is_some_and(|o| o.frames.contains_key(s)));
            }
        }
        Ok(freed)
    }

    fn refill(&mut self, now: u64) {
        for c in &mut self.classes {
            if let Some(rate) = c.cfg.rate_limit {
                let dt = now.saturating_sub(c.refilled_at) as f64 / 1e9;
                c.tokens = (c.tokens + dt * rate as f64).min(BURST_BYTES);
            }
            c.refilled_at = now;
        }
    }

    /// A transfer of `class` with frames to send on `conn` (`None`: on
    /// some connection).
    fn sendable(&self, class: usize, conn: Option<u16>) -> Option<u32> {
        self.classes[class].order.iter().copied().find(|id| {
            self.transfers.get(id).is_some_and(|t| {
                t.next_unsent < t.next_seq
                    && (t.confirmed
                        || t.open_on.is_some() && conn.is_none_or(|c| t.open_on == Some(c)))
            })
        })
    }

    /// The data frame for (transfer, seq), marked as sent on `conn` now.
    fn data_frame(&mut self, transfer: u32, seq: u64, conn: u16, now: u64) -> Option<Frame> {
        let slot = self.transfers.get_mut(&transfer)?.frames.get_mut(&seq)?;
        slot.sent = Some((conn, now));
        slot.first_conn.get_or_insert(conn);
        Some(Frame::Data {
            transfer,
            seq,
            fin: slot.fin,
            payload: slot.payload.clone(),
        })
    }

    /// A frame that blocks in-order delivery and has been out on another
    /// connection for longer than `hedge_after`: worth sending again here
    /// (the receiver drops whichever copy comes second).
    fn late_frame(&self, conn: u16, now: u64) -> Option<(u32, u64)> {
        let after = self.hedge_after?;
        for (&id, t) in self.transfers.iter().filter(|(_, t)| t.confirmed) {
            // The frame that holds the in-order point, and those behind it
            // on the same connection (TCP delivers them after it). Those
            // that went on other connections are late by the same clock
            // but mostly at the receiver already (acks are cumulative):
            // sending them too cost a 1 GiB migration 10 to 20 % more bytes
            // at 1 % loss.
            let stuck_on = t.frames.values().next().and_then(|s| s.first_conn);
            for (&seq, slot) in t.frames.iter().take(HEDGE_DEPTH) {
                match slot.sent {
                    Some((c, at))
                        if c != conn
                            && slot.first_conn == stuck_on
                            && !slot.hedged
                            && now.saturating_sub(at) > after =>
                    {
                        return Some((id, seq));
                    }
                    None => break,
                    _ => {}
                }
            }
        }
        None
    }

    /// Frames late by more than this go out again on an idle connection;
    /// `None` never.
    pub fn set_hedge_after(&mut self, after: Option<u64>) {
        self.hedge_after = after;
    }

    /// The next frame for connection `conn`, which has room to send.
    pub fn poll_transmit(&mut self, conn: u16, now: u64) -> Option<Frame> {
        if let Some(f) = self.control.pop_front() {
            if let Frame::Open { transfer, .. } = &f {
                if let Some(t) = self.transfers.get_mut(transfer) {
                    t.open_on = Some(conn);
                }
            }
            return Some(f);
        }
        while let Some((t, s)) = self.retransmit.pop_front() {
            if let Some(f) = self.data_frame(t, s, conn, now) {
                self.inflight.entry(conn).or_default().push_back((t, s));
                self.stats.frames_retransmitted += 1;
                self.stats.frames_sent += 1;
                return Some(f);
            }
        }
        self.refill(now);
        // Control first; then the eligible class with the least service
        // per unit of weight.
        let pick = if self.sendable(Class::Control as usize, Some(conn)).is_some() {
            Some(Class::Control as usize)
        } else {
            (1..self.classes.len())
                .filter(|&c| self.sendable(c, Some(conn)).is_some())
                .filter(|&c| {
                    self.classes[c].cfg.rate_limit.is_none() || self.classes[c].tokens > 0.0
                })
                .min_by(|&a, &b| {
                    let va = self.classes[a].served / self.classes[a].cfg.weight as f64;
                    let vb = self.classes[b].served / self.classes[b].cfg.weight as f64;
                    va.total_cmp(&vb)
                })
        };
        let Some(pick) = pick else {
            // Nothing new to send: help a frame that is late elsewhere.
            let (id, seq) = self.late_frame(conn, now)?;
            let f = self.data_frame(id, seq, conn, now)?;
            if let Some(slot) = self
                .transfers
                .get_mut(&id)
                .and_then(|t| t.frames.get_mut(&seq))
            {
                slot.hedged = true;
            }
            self.inflight.entry(conn).or_default().push_back((id, seq));
            self.stats.frames_retransmitted += 1;
            self.stats.frames_sent += 1;
            return Some(f);
        };
        let id = self.sendable(pick, Some(conn))?;
        let t = self.transfers.get_mut(&id)?;
        let seq = t.next_unsent;
        t.next_unsent += 1;
        let frame = self.data_frame(id, seq, conn, now)?;
        let len = match &frame {
            Frame::Data { payload, .. } => payload.len(),
            _ => 0,
        };
        if let Some(t) = self.transfers.get_mut(&id) {
            t.unsent_bytes -= len as u64;
        }
        let c = &mut self.classes[pick];
        c.served += len as f64;
        if c.cfg.rate_limit.is_some() {
            c.tokens -= len as f64;
        }
        // Round robin among the class's transfers.
        if let Some(pos) = c.order.iter().position(|&x| x == id) {
            if let Some(x) = c.order.remove(pos) {
                c.order.push_back(x);
            }
        }
        self.inflight.entry(conn).or_default().push_back((id, seq));
        self.stats.frames_sent += 1;
        self.stats.bytes_sent += len as u64;
        Some(frame)
    }

    /// When a rate-limited class with data will have tokens again (ns), if
    /// that is what holds sending back.
    pub fn poll_timeout(&self, now: u64) -> Option<u64> {
        (1..self.classes.len())
            .filter(|&c| self.sendable(c, None).is_some())
            .filter_map(|c| {
                let cs = &self.classes[c];
                let rate = cs.cfg.rate_limit? as f64;
                let tokens = cs.tokens + now.saturating_sub(cs.refilled_at) as f64 / 1e9 * rate;
                (tokens <= 0.0).then(|| now + ((-tokens + 1.0) / rate * 1e9) as u64)
            })
            .min()
    }

    /// Whether anything is waiting to be sent (now or after a rate limit).
    pub fn has_pending(&self) -> bool {
        !self.control.is_empty()
            || !self.retransmit.is_empty()
            || (0..self.classes.len()).any(|c| self.sendable(c, None).is_some())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecvError {
    #[error("data for transfer {0}, which was never opened")]
    Unknown(u32),
    #[error("transfer {transfer}: frame {seq} is beyond the window (next expected {next}); the peer ignores flow control")]
    BeyondWindow { transfer: u32, seq: u64, next: u64 },
    #[error("transfer {transfer}: frame {seq} comes after the final frame {fin}")]
    AfterFin { transfer: u32, seq: u64, fin: u64 },
    #[error("too many open transfers (at most {0})")]
    TooMany(usize),
    #[error("transfer {0}: unknown class")]
    BadClass(u32),
}

struct In {
    next_seq: u64,
    reorder: BTreeMap<u64, (Vec<u8>, bool)>,
    reorder_bytes: u64,
    hasher: blake3::Hasher,
    bytes: u64,
    fin: Option<u64>,
    /// Once complete: its length and hash (said again if the sender asks
    /// again, its first Done having died with a connection).
    done: Option<(u64, [u8; 32])>,
}

/// What handling a data frame produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Chunks now in order, to hand to the application.
    pub chunks: Vec<Vec<u8>>,
    /// The cumulative ack to send.
    pub ack: u64,
    /// Set once the transfer is complete: its length and BLAKE3 hash.
    pub done: Option<(u64, [u8; 32])>,
}

/// A newly opened incoming transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    pub transfer: u32,
    pub class: Class,
    pub name: String,
    pub size_hint: u64,
}

pub const MAX_TRANSFERS: usize = 1024;

pub struct Receiver {
    window: u64,
    transfers: BTreeMap<u32, In>,
}

impl Receiver {
    /// `window`: most bytes held out of order per transfer.
    pub fn new(window: u64) -> Receiver {
        Receiver {
            window,
            transfers: BTreeMap::new(),
        }
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    /// Returns the transfer if it is new (an Open repeated after a
    /// reconnect returns `None`).
    pub fn handle_open(
        &mut self,
        transfer: u32,
        class: u8,
        name: &str,
        size_hint: u64,
    ) -> Result<Option<Opened>, RecvError> {
        if self.transfers.contains_key(&transfer) {
            return Ok(None);
        }
        let class = Class::from_u8(class).ok_or(RecvError::BadClass(transfer))?;
        if self.transfers.len() >= MAX_TRANSFERS {
            // Forget the oldest finished transfer to make room; only
            // unfinished ones count against the limit.
            let done = self
                .transfers
                .iter()
                .find(|(_, t)| t.done.is_some())
                .map(|(&id, _)| id);
            match done {
                Some(id) => {
                    self.transfers.remove(&id);
                }
                None => return Err(RecvError::TooMany(MAX_TRANSFERS)),
            }
        }
        self.transfers.insert(
            transfer,
            In {
                next_seq: 0,
                reorder: BTreeMap::new(),
                reorder_bytes: 0,
                hasher: blake3::Hasher::new(),
                bytes: 0,
                fin: None,
                done: None,
            },
        );
        Ok(Some(Opened {
            transfer,
            class,
            name: name.to_owned(),
            size_hint,
        }))
    }

    pub fn handle_data(
        &mut self,
        transfer: u32,
        seq: u64,
        fin: bool,
        payload: Vec<u8>,
    ) -> Result<Delivery, RecvError> {
        let window = self.window;
        let t = self
            .transfers
            .get_mut(&transfer)
            .ok_or(RecvError::Unknown(transfer))?;
        let mut out = Delivery::default();
        if let Some(f) = t.fin {
            if seq > f {
                return Err(RecvError::AfterFin {
                    transfer,
                    seq,
                    fin: f,
                });
            }
        }
        if seq >= t.next_seq && !t.reorder.contains_key(&seq) {
            if seq > t.next_seq && t.reorder_bytes + payload.len() as u64 > window {
                return Err(RecvError::BeyondWindow {
                    transfer,
                    seq,
                    next: t.next_seq,
                });
            }
            if fin {
                t.fin = Some(seq);
                if t.reorder.keys().next_back().is_some_and(|&k| k > seq) {
                    return Err(RecvError::AfterFin {
                        transfer,
                        seq,
                        fin: seq,
                    });
                }
            }
            t.reorder_bytes += payload.len() as u64;
            t.reorder.insert(seq, (payload, fin));
            while let Some(entry) = t.reorder.first_entry() {
                if *entry.key() != t.next_seq {
                    break;
                }
                let (p, _) = entry.remove();
                t.reorder_bytes -= p.len() as u64;
                t.hasher.update(&p);
                t.bytes += p.len() as u64;
                t.next_seq += 1;
                out.chunks.push(p);
            }
        }
        // Duplicates (resent after a connection died) are dropped here; one
        // of a complete transfer gets its Done again.
        out.ack = t.next_seq;
        if t.done.is_none() && t.fin.is_some_and(|f| t.next_seq > f) {
            t.done = Some((t.bytes, *t.hasher.finalize().as_bytes()));
        }
        out.done = t.done;
        Ok(out)
    }

    /// The most recently completed transfers (at most `n`): length and
    /// hash, said again to a sender that reconnects (a Done may have died
    /// with its connection).
    pub fn recently_done(&self, n: usize) -> Vec<(u32, u64, [u8; 32])> {
        let mut v: Vec<_> = self
            .transfers
            .iter()
            .rev()
            .filter_map(|(&id, t)| t.done.map(|(b, h)| (id, b, h)))
            .take(n)
            .collect();
        v.reverse();
        v
    }

    /// Where every open transfer stands, for the acks sent on reconnect.
    pub fn positions(&self) -> Vec<(u32, u64)> {
        self.transfers
            .iter()
            .map(|(&id, t)| (id, t.next_seq))
            .collect()
    }

    pub fn close(&mut self, transfer: u32) {
        self.transfers.remove(&transfer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(f: &Frame) -> (u32, u64) {
        match f {
            Frame::Data { transfer, seq, .. } => (*transfer, *seq),
            other => panic!("expected data, got {other:?}"),
        }
    }

    #[test]
    fn open_goes_first_then_data_in_order() {
        let mut s = Sender::new(1 << 20);
        s.open(1, Class::Migration, "a", 0).expect("open");
        s.push(1, vec![1; 10], false).expect("push");
        s.push(1, vec![2; 10], true).expect("push");
        assert!(matches!(
            s.poll_transmit(0, 0),
            Some(Frame::Open { transfer: 1, .. })
        ));
        // Before the receiver acknowledged the Open, data follows it on
        // its connection only.
        assert_eq!(s.poll_transmit(1, 0), None);
        assert_eq!(data(&s.poll_transmit(0, 0).expect("f")), (1, 0));
        s.handle_ack(1, 0).expect("open acked");
        assert_eq!(data(&s.poll_transmit(1, 0).expect("f")), (1, 1));
        assert_eq!(s.poll_transmit(0, 0), None);
    }

    #[test]
    fn a_connection_is_stalled_by_an_old_unacknowledged_frame_not_by_its_silence() {
        let mut s = Sender::new(1 << 20);
        s.open(1, Class::Control, "a", 0).expect("open");
        s.push(1, vec![1; 10], true).expect("push");
        assert!(matches!(s.poll_transmit(0, 0), Some(Frame::Open { .. })));
        assert_eq!(data(&s.poll_transmit(0, 1_000).expect("f")), (1, 0));
        assert!(!s.conn_unacked_since(0, 1_500, 1_000), "sent just now");
        assert!(s.conn_unacked_since(0, 2_500, 1_000));
        assert!(!s.conn_unacked_since(1, 2_500, 1_000), "nothing on conn 1");
        s.handle_ack(1, 1).expect("ack");
        assert!(!s.conn_unacked_since(0, 9_000, 1_000));
    }

    #[test]
    fn a_complete_transfer_says_done_again_when_asked_again() {
        let mut r = Receiver::new(1 << 20);
        r.handle_open(1, 1, "t", 0).expect("open");
        let first = r.handle_data(1, 0, true, vec![7; 10]).expect("data");
        assert_eq!(first.chunks.len(), 1);
        let done = first.done.expect("done");
        let again = r.handle_data(1, 0, true, vec![7; 10]).expect("duplicate");
        assert!(again.chunks.is_empty());
        assert_eq!(again.done, Some(done));
        assert_eq!(r.recently_done(8), vec![(1, done.0, done.1)]);
        r.handle_open(2, 1, "u", 0).expect("open");
        assert_eq!(r.recently_done(8).len(), 1, "only complete transfers");
    }

    #[test]
    fn data_behind_an_open_lost_with_its_connection_follows_the_open_again() {
        let mut s = Sender::new(1 << 20);
        s.open(1, Class::Control, "a", 0).expect("open");
        s.push(1, vec![1; 10], false).expect("push");
        s.push(1, vec![2; 10], true).expect("push");
        assert!(matches!(s.poll_transmit(0, 0), Some(Frame::Open { .. })));
        assert_eq!(data(&s.poll_transmit(0, 0).expect("f")), (1, 0));
        s.conn_lost(0);
        // Not on connection 2 ahead of the Open that goes on connection 1.
        assert!(matches!(s.poll_transmit(1, 0), Some(Frame::Open { .. })));
        assert_eq!(s.poll_transmit(2, 0), None);
        assert_eq!(data(&s.poll_transmit(1, 0).expect("f")), (1, 0));
        assert_eq!(data(&s.poll_transmit(1, 0).expect("f")), (1, 1));
        assert_eq!(s.stats().frames_retransmitted, 0);
    }

    #[test]
    fn window_backpressure_and_acks() {
        let mut s = Sender::new(crate::frame::MAX_CHUNK as u64);
        s.open(1, Class::Replication, "a", 0).expect("open");
        assert_eq!(s.push(1, vec![0; 600_000], false), Ok(true));
        assert_eq!(s.push(1, vec![0; 600_000], false), Ok(false), "window full");
        s.handle_ack(1, 0).expect("open acked");
        s.poll_transmit(0, 0);
        s.poll_transmit(0, 0);
        assert_eq!(s.handle_ack(1, 1), Ok(600_000));
        assert_eq!(s.push(1, vec![0; 600_000], true), Ok(true));
        assert!(matches!(s.handle_ack(1, 99), Err(SendError::BadAck { .. })));
    }

    #[test]
    fn the_unsent_limit_holds_a_source_to_the_links_pace() {
        let mut s = Sender::new(64 << 20);
        s.set_max_unsent(1 << 20);
        s.open(1, Class::Migration, "m", 0).expect("open");
        s.handle_ack(1, 0).expect("open acked");
        assert_eq!(s.push(1, vec![0; 600_000], false), Ok(true));
        assert!(!s.has_room(1, 600_000));
        assert_eq!(s.push(1, vec![0; 600_000], false), Ok(false), "queue full");
        // Sent but not acknowledged: the window has room, the queue too.
        assert!(matches!(s.poll_transmit(0, 0), Some(Frame::Open { .. })));
        assert_eq!(data(&s.poll_transmit(0, 0).expect("frame 0")), (1, 0));
        assert_eq!(s.push(1, vec![0; 600_000], false), Ok(true));
        assert_eq!(s.push(1, vec![0; 600_000], false), Ok(false));
    }

    #[test]
    fn lost_connection_frames_go_out_again_once() {
        let mut s = Sender::new(1 << 24);
        s.open(7, Class::Migration, "x", 0).expect("open");
        for i in 0..4u8 {
            s.push(7, vec![i; 100], i == 3).expect("push");
        }
        s.poll_transmit(0, 0); // open
        s.handle_ack(7, 0).expect("open acked");
        let on_a: Vec<_> = (0..2)
            .map(|_| data(&s.poll_transmit(0, 0).expect("f")))
            .collect();
        let on_b: Vec<_> = (0..2)
            .map(|_| data(&s.poll_transmit(1, 0).expect("f")))
            .collect();
        assert_eq!(on_a, vec![(7, 0), (7, 1)]);
        assert_eq!(on_b, vec![(7, 2), (7, 3)]);
        s.handle_ack(7, 1).expect("ack"); // frame 0 arrived
        s.conn_lost(0);
        // Only frame 1 is resent, on the surviving connection.
        assert_eq!(data(&s.poll_transmit(1, 0).expect("f")), (7, 1));
        assert_eq!(s.poll_transmit(1, 0), None);
        assert_eq!(s.stats().frames_retransmitted, 1);
        // An Open lost with its connection is sent again.
        s.open(8, Class::Migration, "y", 0).expect("open");
        assert!(matches!(
            s.poll_transmit(1, 0),
            Some(Frame::Open { transfer: 8, .. })
        ));
        s.conn_lost(1);
        assert!(matches!(
            s.poll_transmit(2, 0),
            Some(Frame::Open { transfer: 8, .. })
        ));
    }

    /// A sender that hedges frames late by 1 µs, with transfer 1 open and
    /// confirmed.
    fn hedging_sender() -> Sender {
        let mut s = Sender::new(1 << 24);
        s.set_hedge_after(Some(1_000));
        s.open(1, Class::Migration, "x", 0).expect("open");
        assert!(matches!(s.poll_transmit(0, 0), Some(Frame::Open { .. })));
        s.handle_ack(1, 0).expect("open acked");
        s
    }

    #[test]
    fn a_late_frame_is_hedged_once_on_an_idle_connection() {
        let mut s = hedging_sender();
        s.push(1, vec![0; 10], false).expect("push");
        s.push(1, vec![1; 10], true).expect("push");
        assert_eq!(data(&s.poll_transmit(0, 0).expect("f")), (1, 0));
        assert_eq!(data(&s.poll_transmit(1, 0).expect("f")), (1, 1));
        // Not late yet.
        assert_eq!(s.poll_transmit(1, 500), None);
        // Frame 0 (on conn 0) is late: conn 1 sends it again, once.
        assert_eq!(data(&s.poll_transmit(1, 2_000).expect("f")), (1, 0));
        assert_eq!(s.poll_transmit(1, 3_000), None);
        // Frame 1 is late by now too, but it went on another connection
        // than frame 0, which holds the in-order point: the receiver may
        // well hold it. Frame 0, hedged once already, is not sent a third
        // time.
        assert_eq!(s.poll_transmit(0, 5_000), None);
        s.handle_ack(1, 1).expect("frame 0 acked");
        assert_eq!(s.poll_transmit(0, 5_000).map(|f| data(&f)), Some((1, 1)));
        assert_eq!(s.poll_transmit(0, 9_000), None);
        assert_eq!(s.stats().frames_retransmitted, 2);
    }

    #[test]
    fn frames_stuck_behind_a_late_one_on_its_connection_are_hedged_others_not() {
        let mut s = hedging_sender();
        for i in 0..3 {
            s.push(1, vec![i; 10], i == 2).expect("push");
        }
        assert_eq!(data(&s.poll_transmit(0, 0).expect("f")), (1, 0));
        assert_eq!(data(&s.poll_transmit(0, 0).expect("f")), (1, 1));
        assert_eq!(data(&s.poll_transmit(1, 0).expect("f")), (1, 2));
        // Conn 0 stalls: frames 0 and 1 go again on conn 1; frame 2, which
        // went on conn 1, is not stuck behind them.
        assert_eq!(data(&s.poll_transmit(1, 2_000).expect("f")), (1, 0));
        assert_eq!(data(&s.poll_transmit(1, 2_000).expect("f")), (1, 1));
        assert_eq!(s.poll_transmit(2, 2_000), None);
        assert_eq!(s.stats().frames_retransmitted, 2);
    }

    #[test]
    fn control_is_strict_and_weights_share_the_rest() {
        let mut s = Sender::new(1 << 30);
        s.open(1, Class::Migration, "m", 0).expect("open");
        s.open(2, Class::Background, "b", 0).expect("open");
        s.open(3, Class::Control, "c", 0).expect("open");
        for t in 1..=3 {
            s.handle_ack(t, 0).expect("open acked");
        }
        for i in 0..200 {
            s.push(1, vec![0; 1000], false).expect("push");
            s.push(2, vec![0; 1000], false).expect("push");
            if i < 5 {
                s.push(3, vec![0; 1000], false).expect("push");
            }
        }
        let mut order = Vec::new();
        while let Some(f) = s.poll_transmit(0, 0) {
            if let Frame::Data { transfer, .. } = f {
                order.push(transfer);
            }
        }
        assert_eq!(&order[..5], &[3, 3, 3, 3, 3], "control first");
        // Migration (weight 8) gets about 8x background (weight 1) while both are busy.
        let first = &order[5..95];
        let m = first.iter().filter(|&&t| t == 1).count();
        let b = first.iter().filter(|&&t| t == 2).count();
        assert!(m >= 7 * b && b >= 8, "migration {m}, background {b}");
    }

    #[test]
    fn rate_limit_holds_a_class_back() {
        let mut s = Sender::new(1 << 30);
        s.set_class(
            Class::Background,
            ClassConfig {
                weight: 1,
                rate_limit: Some(1_000_000),
            },
        );
        s.open(1, Class::Background, "b", 0).expect("open");
        s.handle_ack(1, 0).expect("open acked");
        for _ in 0..1000 {
            s.push(1, vec![0; 10_000], false).expect("push");
        }
        s.poll_transmit(0, 0); // open
        let mut sent = 0;
        while s.poll_transmit(0, 0).is_some() {
            sent += 10_000;
        }
        // The burst allowance, then nothing until tokens come back.
        assert!(sent <= 256 * 1024 + 10_000, "{sent}");
        let wake = s.poll_timeout(0).expect("a wake-up time");
        assert!(wake > 0);
        // One second later, about 1 MB more may go.
        let mut more = 0;
        while s.poll_transmit(0, 1_000_000_000).is_some() {
            more += 10_000;
        }
        assert!((200_000..=1_300_000).contains(&more), "{more}");
    }

    #[test]
    fn receiver_reorders_drops_duplicates_and_checks_the_peer() {
        let mut r = Receiver::new(1000);
        assert!(r.handle_open(1, 1, "f", 0).expect("open").is_some());
        assert_eq!(r.handle_open(1, 1, "f", 0), Ok(None));
        let d = r.handle_data(1, 1, false, vec![2; 10]).expect("ok");
        assert!(d.chunks.is_empty());
        assert_eq!(d.ack, 0);
        let d = r.handle_data(1, 0, false, vec![1; 10]).expect("ok");
        assert_eq!(d.chunks, vec![vec![1; 10], vec![2; 10]]);
        assert_eq!(d.ack, 2);
        // A duplicate changes nothing.
        let d = r.handle_data(1, 1, false, vec![9; 10]).expect("ok");
        assert!(d.chunks.is_empty() && d.ack == 2);
        let d = r.handle_data(1, 2, true, vec![3; 5]).expect("ok");
        let mut h = blake3::Hasher::new();
        h.update(&[1; 10]);
        h.update(&[2; 10]);
        h.update(&[3; 5]);
        assert_eq!(d.done, Some((25, *h.finalize().as_bytes())));
        assert!(matches!(
            r.handle_data(1, 9, false, vec![]),
            Err(RecvError::AfterFin { .. })
        ));
        assert!(matches!(
            r.handle_data(5, 0, false, vec![]),
            Err(RecvError::Unknown(5))
        ));
        // A peer that runs past the window is refused.
        r.handle_open(2, 1, "g", 0).expect("open");
        r.handle_data(2, 5, false, vec![0; 900]).expect("within");
        assert!(matches!(
            r.handle_data(2, 6, false, vec![0; 200]),
            Err(RecvError::BeyondWindow { .. })
        ));
        assert!(matches!(
            r.handle_open(3, 9, "h", 0),
            Err(RecvError::BadClass(3))
        ));
    }

    #[test]
    fn finished_transfers_make_room_unfinished_ones_do_not() {
        let mut r = Receiver::new(1 << 20);
        for id in 0..MAX_TRANSFERS as u32 {
            r.handle_open(id, 1, "t", 0).expect("open");
        }
        assert_eq!(
            r.handle_open(5000, 1, "t", 0),
            Err(RecvError::TooMany(MAX_TRANSFERS))
        );
        r.handle_data(7, 0, true, vec![1])
            .expect("finish transfer 7");
        assert!(r.handle_open(5000, 1, "t", 0).expect("room").is_some());
        assert!(matches!(
            r.handle_data(7, 0, true, vec![1]),
            Err(RecvError::Unknown(7))
        ));
    }
}
