//! The link model: a sans-IO state machine deciding, for each packet that
//! enters one direction of a link, whether it is lost, dropped by the queue,
//! or delivered, and when.
//!
//! A packet arriving at `now` (ns on the lab's clock) goes through:
//! 1. loss: Bernoulli, or Gilbert-Elliott with the given mean burst length;
//! 2. the bottleneck queue: the bytes still waiting to be serialised are
//!    counted; if the packet does not fit under the limit it is tail-dropped;
//! 3. serialisation at the link rate (constant, or a trace's rate that
//!    changes over time): it starts when the previous packet is done;
//! 4. propagation: one-way delay, plus jitter that never reorders packets.
//!
//! Everything is decided on arrival, so the caller only needs a delay line
//! ordered by delivery time (which is FIFO). No clocks, no I/O, seeded RNG.

use std::collections::VecDeque;

use crate::params::LinkParams;
use crate::trace::RateSchedule;

/// Most packets one direction may hold (queued plus in flight), whatever
/// the settings: the emulator's memory stays bounded.
pub const MAX_PACKETS_HELD: usize = 200_000;

/// What happens to a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Lost,
    QueueFull,
    /// Deliver at this time (ns).
    Deliver(u64),
}

/// SplitMix64: seeded, fast, good enough for loss and jitter draws.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

enum Service {
    Unlimited,
    Constant { bytes_per_ns: f64 },
    Trace(RateSchedule),
}

pub struct LinkModel {
    params: LinkParams,
    service: Service,
    queue_limit: u64,
    rng: Rng,
    /// Gilbert-Elliott: in the bad (losing) state.
    bad: bool,
    /// When the serialiser is free again.
    busy_until: u64,
    /// (serialisation end, bytes) of packets not yet serialised.
    backlog: VecDeque<(u64, u64)>,
    backlog_bytes: u64,
    /// Delivery time of the last packet: nothing is delivered before it.
    last_delivery: u64,
    /// Where on the lab's clock a trace's time 0 lies (the last period
    /// that began at or before it); kept across new settings.
    trace_origin: u64,
}

impl LinkModel {
    /// `trace` must be the loaded schedule of `params.trace`, if any.
    pub fn new(params: LinkParams, trace: Option<RateSchedule>, seed: u64) -> LinkModel {
        let mut m = LinkModel {
            params: LinkParams::default(),
            service: Service::Unlimited,
            queue_limit: u64::MAX,
            rng: Rng::new(seed),
            bad: false,
            busy_until: 0,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            last_delivery: 0,
            trace_origin: 0,
        };
        m.set_params(params, trace);
        m
    }

    /// New settings apply to packets arriving from now on; packets already
    /// scheduled keep their times.
    pub fn set_params(&mut self, params: LinkParams, trace: Option<RateSchedule>) {
        let (service, mean_bps) = match (trace, params.rate_bps) {
            (Some(t), _) => {
                let mean = t.mean_bytes_per_sec() * 8.0;
                (Service::Trace(t), Some(mean))
            }
            (None, Some(r)) => (
                Service::Constant {
                    bytes_per_ns: r as f64 / 8.0 / 1e9,
                },
                Some(r as f64),
            ),
            (None, None) => (Service::Unlimited, None),
        };
        self.queue_limit = params.queue_limit_bytes(mean_bps);
        self.service = service;
        self.params = params;
    }

    /// A trace (this one and any set later) plays from its start at `now`.
    pub fn restart_trace(&mut self, now: u64) {
        self.trace_origin = now;
    }

    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    pub fn queue_limit_bytes(&self) -> u64 {
        self.queue_limit
    }

    /// Bytes waiting to be serialised at `now`.
    pub fn backlog_bytes(&mut self, now: u64) -> u64 {
        while let Some(&(end, bytes)) = self.backlog.front() {
            if end > now {
                break;
            }
            self.backlog.pop_front();
            self.backlog_bytes -= bytes;
        }
        self.backlog_bytes
    }

    fn lost(&mut self) -> bool {
        let p = self.params.loss;
        if p <= 0.0 {
            return false;
        }
        if p >= 1.0 {
            return true;
        }
        if self.params.burst <= 1.0 {
            return self.rng.unit() < p;
        }
        // Gilbert-Elliott with a loss-certain bad state: leave it with
        // r = 1/burst, enter it with q = p r / (1 - p), so that the share of
        // packets in it is q / (q + r) = p.
        let r = 1.0 / self.params.burst;
        let q = p * r / (1.0 - p);
        let u = self.rng.unit();
        self.bad = if self.bad { u >= r } else { u < q };
        self.bad
    }

    /// Decides the fate of a `bytes`-long packet arriving at `now`.
    /// `held` is how many packets the caller holds for this direction.
    pub fn on_packet(&mut self, now: u64, bytes: usize, held: usize) -> Verdict {
        if self.lost() {
            return Verdict::Lost;
        }
        let size = bytes as u64;
        if self.backlog_bytes(now) + size > self.queue_limit || held >= MAX_PACKETS_HELD {
            return Verdict::QueueFull;
        }
        let start = now.max(self.busy_until);
        let end = match &self.service {
            Service::Unlimited => start,
            Service::Constant { bytes_per_ns } => {
                start + (size as f64 / bytes_per_ns).ceil() as u64
            }
            Service::Trace(t) => {
                // Lab time → trace time: origin falls on a period's start.
                let phase = (t.period_ns - self.trace_origin % t.period_ns) % t.period_ns;
                t.finish(start + phase, size as f64) - phase
            }
        };
        self.busy_until = end;
        if end > now {
            self.backlog.push_back((end, size));
            self.backlog_bytes += size;
        }
        let delay = self.params.delay.as_nanos() as i128;
        let jitter = self.params.jitter.as_nanos() as i128;
        let offset = if jitter > 0 {
            delay + ((self.rng.unit() * 2.0 - 1.0) * jitter as f64) as i128
        } else {
            delay
        };
        let at = (end as i128 + offset.max(0)) as u64;
        let at = at.max(self.last_delivery);
        self.last_delivery = at;
        Verdict::Deliver(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn params(list: &str) -> LinkParams {
        let mut p = LinkParams::default();
        p.apply_list(list).expect("valid");
        p
    }

    #[test]
    fn constant_rate_and_delay() {
        // 12 Mbit/s: a 1500-byte packet takes 1 ms; 10 ms one-way delay.
        let mut m = LinkModel::new(params("rate=12mbit,delay=10ms"), None, 1);
        assert_eq!(m.on_packet(0, 1500, 0), Verdict::Deliver(11 * MS));
        // Back to back: the second waits for the first.
        assert_eq!(m.on_packet(0, 1500, 0), Verdict::Deliver(12 * MS));
        // After an idle gap it goes at once.
        assert_eq!(m.on_packet(100 * MS, 1500, 0), Verdict::Deliver(111 * MS));
    }

    #[test]
    fn a_restarted_trace_plays_from_its_start() {
        // 12 Mbit/s (1 ms a packet) for 10 ms, then 1.2 Mbit/s for 10 ms.
        let trace = RateSchedule {
            segments: vec![(0, 1.5e6), (10 * MS, 1.5e5)],
            period_ns: 20 * MS,
        };
        let mut m = LinkModel::new(params("queue=1mb"), Some(trace.clone()), 1);
        // On the lab's clock: at 15 ms the slow part plays (150 bytes a ms).
        assert_eq!(m.on_packet(15 * MS, 150, 0), Verdict::Deliver(16 * MS));
        // Restarted at 35 ms: the fast part plays from there, also after
        // new settings (the origin stays), and the trace still loops.
        m.restart_trace(35 * MS);
        m.set_params(params("queue=1mb"), Some(trace));
        assert_eq!(m.on_packet(35 * MS, 1500, 0), Verdict::Deliver(36 * MS));
        assert_eq!(m.on_packet(46 * MS, 150, 0), Verdict::Deliver(47 * MS));
        assert_eq!(m.on_packet(75 * MS, 1500, 0), Verdict::Deliver(76 * MS));
    }

    #[test]
    fn queue_tail_drops_beyond_limit() {
        let mut m = LinkModel::new(params("rate=12mbit,queue=3000"), None, 1);
        assert!(matches!(m.on_packet(0, 1500, 0), Verdict::Deliver(_)));
        assert!(matches!(m.on_packet(0, 1500, 0), Verdict::Deliver(_)));
        assert_eq!(m.on_packet(0, 1500, 0), Verdict::QueueFull);
        // Once the first is serialised there is room again.
        assert!(matches!(m.on_packet(MS, 1500, 0), Verdict::Deliver(_)));
        assert_eq!(m.on_packet(MS, 1500, MAX_PACKETS_HELD), Verdict::QueueFull);
    }

    #[test]
    fn bernoulli_and_bursty_loss_hit_the_average() {
        for (list, want_burst) in [("loss=2%", 1.0), ("loss=2%,burst=4", 4.0)] {
            let mut m = LinkModel::new(params(list), None, 7);
            let n = 400_000;
            let (mut lost, mut bursts, mut prev) = (0, 0, false);
            for i in 0..n {
                let l = m.on_packet(i * MS, 100, 0) == Verdict::Lost;
                lost += l as u32;
                bursts += (l && !prev) as u32;
                prev = l;
            }
            let rate = lost as f64 / n as f64;
            let burst = lost as f64 / bursts as f64;
            assert!((rate - 0.02).abs() < 0.002, "{list}: loss {rate}");
            assert!(
                (burst - want_burst).abs() < want_burst * 0.1 + 0.05,
                "{list}: mean burst {burst}"
            );
        }
    }

    #[test]
    fn jitter_never_reorders() {
        let mut m = LinkModel::new(params("delay=20ms,jitter=5ms"), None, 3);
        let mut last = 0;
        let mut spread = (u64::MAX, 0);
        for i in 0..10_000u64 {
            let Verdict::Deliver(at) = m.on_packet(i * MS / 10, 100, 0) else {
                panic!("no loss configured")
            };
            assert!(at >= last, "reordered");
            last = at;
            let d = at - i * MS / 10;
            spread = (spread.0.min(d), spread.1.max(d));
        }
        assert!(
            spread.0 >= 15 * MS && spread.1 <= 25 * MS + MS,
            "{spread:?}"
        );
        assert!(
            spread.1 - spread.0 > 5 * MS,
            "jitter had no effect: {spread:?}"
        );
    }

    #[test]
    fn settings_change_for_new_packets_only() {
        let mut m = LinkModel::new(params("delay=10ms"), None, 1);
        assert_eq!(m.on_packet(0, 100, 0), Verdict::Deliver(10 * MS));
        m.set_params(params("delay=50ms"), None);
        assert_eq!(m.on_packet(MS, 100, 0), Verdict::Deliver(51 * MS));
        m.set_params(params("delay=1ms"), None);
        // Never earlier than a packet already scheduled.
        assert_eq!(m.on_packet(2 * MS, 100, 0), Verdict::Deliver(51 * MS));
    }
}
