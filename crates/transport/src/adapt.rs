//! Choosing the number of connections (sans-IO): a hill climb on measured
//! goodput. Start small; add a connection while that raises goodput by
//! more than [`GAIN`]; go back when it does not; after a pause, probe again,
//! alternately up and down (fewer connections that carry as much are
//! better). Goodput that still climbs with the same connections is their
//! start-up, not a measure of the count: nothing is probed until it levels
//! off (probing then took every start-up for a gain, and BBR connections
//! added for nothing overflowed the bottleneck's queue: a 1 GiB migration
//! at 100 ms RTT put 10-40 % more bytes on the link with 2 to 4
//! connections than with 1, for no gain in time).

/// A change must raise goodput by this share to count.
pub const GAIN: f64 = 0.08;
/// Intervals to wait after a probe failed; after each further probe up in a
/// row that fails, twice as long, up to 16 times (each probe up starts a
/// connection, whose start-up overfills the bottleneck's queue a little).
const HOLD: u32 = 5;

#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Hold,
    Set { streams: usize, reason: String },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Probe {
    Up,
    Down,
}

pub struct StreamController {
    min: usize,
    max: usize,
    /// The settled count and its goodput, once measured.
    base: Option<(usize, f64)>,
    probing: Option<Probe>,
    hold: u32,
    next_probe: Probe,
    /// Probes up in a row that found no gain.
    failed_ups: u32,
}

fn mbit(bps: f64) -> String {
    format!("{:.1} Mbit/s", bps / 1e6)
}

impl StreamController {
    pub fn new((min, max): (usize, usize)) -> StreamController {
        StreamController {
            min: min.max(1),
            max: max.max(min.max(1)),
            base: None,
            probing: None,
            hold: 0,
            next_probe: Probe::Up,
            failed_ups: 0,
        }
    }

    /// Forgets measurements (after a reconnect, say).
    pub fn reset(&mut self, _streams: usize) {
        self.base = None;
        self.probing = None;
        self.hold = 0;
        self.failed_ups = 0;
    }

    /// One interval's goodput (bit/s) with `streams` connections.
    pub fn observe(&mut self, streams: usize, rate: f64) -> Decision {
        if self.min == self.max {
            return Decision::Hold;
        }
        let Some((base_n, base_rate)) = self.base else {
            self.base = Some((streams, rate));
            return Decision::Hold;
        };
        match self.probing.take() {
            Some(Probe::Up) => {
                if rate > base_rate * (1.0 + GAIN) {
                    self.base = Some((streams, rate));
                    self.failed_ups = 0;
                    if streams < self.max {
                        self.probing = Some(Probe::Up);
                        return Decision::Set {
                            streams: streams + 1,
                            reason: format!(
                                "{streams} streams raised goodput {} -> {}; trying one more",
                                mbit(base_rate),
                                mbit(rate)
                            ),
                        };
                    }
                    return Decision::Hold;
                }
                self.hold = HOLD << self.failed_ups.min(4);
                self.failed_ups += 1;
                self.next_probe = Probe::Down;
                Decision::Set {
                    streams: base_n,
                    reason: format!(
                        "{streams} streams gave {} vs {} with {base_n}: no gain, back to {base_n}",
                        mbit(rate),
                        mbit(base_rate)
                    ),
                }
            }
            Some(Probe::Down) => {
                if rate >= base_rate * (1.0 - GAIN / 2.0) {
                    self.base = Some((streams, rate));
                    self.hold = HOLD;
                    self.next_probe = Probe::Up;
                    return Decision::Hold;
                }
                self.hold = HOLD;
                self.next_probe = Probe::Up;
                Decision::Set {
                    streams: base_n,
                    reason: format!(
                        "{streams} streams gave {} vs {} with {base_n}: back to {base_n}",
                        mbit(rate),
                        mbit(base_rate)
                    ),
                }
            }
            None => {
                // Settled: follow the link's drift, then probe again; not
                // while goodput still climbs.
                self.base = Some((streams, rate));
                if rate > base_rate * (1.0 + GAIN) {
                    return Decision::Hold;
                }
                if self.hold > 0 {
                    self.hold -= 1;
                    return Decision::Hold;
                }
                self.probe(streams, rate)
            }
        }
    }

    fn probe(&mut self, streams: usize, rate: f64) -> Decision {
        let dir = if self.next_probe == Probe::Down && streams > self.min {
            Probe::Down
        } else if streams < self.max {
            Probe::Up
        } else if streams > self.min {
            Probe::Down
        } else {
            return Decision::Hold;
        };
        self.probing = Some(dir);
        let (to, why) = match dir {
            Probe::Up => (
                streams + 1,
                "probing whether one more stream raises goodput",
            ),
            Probe::Down => (
                streams - 1,
                "probing whether one stream fewer carries as much",
            ),
        };
        Decision::Set {
            streams: to,
            reason: format!("{why} (now {} with {streams})", mbit(rate)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link where each stream gets `per` up to a cap of `cap`.
    fn run(per: f64, cap: f64, start: usize, rounds: usize) -> usize {
        let mut c = StreamController::new((1, 16));
        let mut n = start;
        for _ in 0..rounds {
            let rate = (per * n as f64).min(cap);
            if let Decision::Set { streams, .. } = c.observe(n, rate) {
                n = streams;
            }
        }
        n
    }

    #[test]
    fn climbs_while_streams_help_and_stops_at_the_cap() {
        // Each stream 10 Mbit/s (loss-limited CUBIC), link 100: about 10.
        let n = run(10e6, 100e6, 2, 60);
        assert!((9..=11).contains(&n), "{n}");
    }

    #[test]
    fn one_stream_that_fills_the_link_stays_small() {
        // A BBR stream fills the link alone: no reason for more than 2.
        let n = run(100e6, 100e6, 2, 60);
        assert!(n <= 2, "{n}");
    }

    #[test]
    fn a_start_up_is_not_taken_for_a_gain() {
        // One BBR-like stream doubles its goodput per interval up to the
        // link's 100 Mbit/s; a second stream ramps the same way. While the
        // rate climbs nothing is probed; once level, a probe up finds no
        // gain and goes back.
        let mut c = StreamController::new((1, 16));
        let mut n = 1;
        let mut rate = 5e6;
        let mut most = n;
        for _ in 0..40 {
            if let Decision::Set { streams, .. } = c.observe(n, rate) {
                n = streams;
            }
            most = most.max(n);
            rate = (rate * 2.0).min(100e6);
        }
        assert_eq!(n, 1);
        assert!(most <= 2, "{most}");
    }

    #[test]
    fn probes_that_find_nothing_come_ever_less_often() {
        // One stream fills the link: each probe up fails, and the pause
        // before the next doubles (5, 10, 20, 40 intervals).
        let mut c = StreamController::new((1, 16));
        let (mut n, mut ups) = (1, 0);
        for _ in 0..100 {
            if let Decision::Set { streams, .. } = c.observe(n, 100e6) {
                ups += (streams > n) as u32;
                n = streams;
            }
        }
        assert_eq!(n, 1);
        assert!((3..=5).contains(&ups), "{ups} probes up");
    }

    #[test]
    fn fixed_count_never_changes() {
        let mut c = StreamController::new((4, 4));
        assert_eq!(c.observe(4, 1e6), Decision::Hold);
        assert_eq!(c.observe(4, 1e9), Decision::Hold);
    }
}
