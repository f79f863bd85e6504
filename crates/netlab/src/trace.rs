//! Bandwidth traces as a piecewise-constant rate that loops.
//!
//! Two formats are read:
//! - mahimahi packet-delivery schedules: one integer a line, the millisecond
//!   at which one 1500-byte packet may be delivered (repeats mean several);
//!   the schedule loops at its last millisecond.
//! - two columns `time_s  Mbps` (the Pensieve-cooked FCC and Norway traces);
//!   each rate holds until the next sample, the last for the median spacing.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read trace {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("trace {path}, line {line}: {problem}")]
    Parse {
        path: String,
        line: usize,
        problem: String,
    },
    #[error("trace {path} has no capacity at all (every rate is zero)")]
    Empty { path: String },
}

/// A rate that changes over time and repeats with `period_ns`.
#[derive(Clone, Debug, PartialEq)]
pub struct RateSchedule {
    /// (start, bytes per second), sorted by start; the first starts at 0.
    pub segments: Vec<(u64, f64)>,
    pub period_ns: u64,
}

const MS: u64 = 1_000_000;

impl RateSchedule {
    pub fn load(path: &Path, scale: f64) -> Result<RateSchedule, TraceError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
            path: name.clone(),
            source,
        })?;
        let two_columns = text
            .lines()
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| l.split_whitespace().count() >= 2);
        let s = if two_columns {
            Self::from_columns(&text, &name, scale)?
        } else {
            Self::from_mahimahi(&text, &name, scale)?
        };
        if s.segments.iter().all(|&(_, r)| r <= 0.0) {
            return Err(TraceError::Empty { path: name });
        }
        Ok(s)
    }

    fn from_mahimahi(text: &str, name: &str, scale: f64) -> Result<RateSchedule, TraceError> {
        let mut per_ms: Vec<u32> = Vec::new();
        let mut last = 0u64;
        for (i, line) in text.lines().enumerate() {
            let l = line.trim();
            if l.is_empty() {
                continue;
            }
            let ms: u64 = l.parse().map_err(|_| TraceError::Parse {
                path: name.into(),
                line: i + 1,
                problem: format!("{l:?} is not a millisecond count"),
            })?;
            if ms < last {
                return Err(TraceError::Parse {
                    path: name.into(),
                    line: i + 1,
                    problem: "times must not decrease".into(),
                });
            }
            if ms > 24 * 3600 * 1000 {
                return Err(TraceError::Parse {
                    path: name.into(),
                    line: i + 1,
                    problem: "trace longer than a day".into(),
                });
            }
            last = ms;
            if per_ms.len() <= ms as usize {
                per_ms.resize(ms as usize + 1, 0);
            }
            per_ms[ms as usize] += 1;
        }
        // The schedule loops at its last millisecond (mahimahi's rule): the
        // opportunities of ms 0 and of the last ms fall on one instant.
        let period_ms = last.max(1);
        if per_ms.len() as u64 > period_ms {
            let tail = per_ms.pop().unwrap_or(0);
            per_ms[0] += tail;
        }
        per_ms.resize(period_ms as usize, 0);
        let mut segments: Vec<(u64, f64)> = Vec::new();
        for (ms, &n) in per_ms.iter().enumerate() {
            let rate = n as f64 * 1500.0 * 1000.0 * scale;
            push_merged(&mut segments, ms as u64 * MS, rate);
        }
        Ok(RateSchedule {
            segments,
            period_ns: period_ms * MS,
        })
    }

    fn from_columns(text: &str, name: &str, scale: f64) -> Result<RateSchedule, TraceError> {
        let mut samples: Vec<(f64, f64)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let mut cols = line.split_whitespace();
            let (Some(t), Some(r)) = (cols.next(), cols.next()) else {
                continue;
            };
            let bad = |what: &str| TraceError::Parse {
                path: name.into(),
                line: i + 1,
                problem: format!("{what} is not a number"),
            };
            let t: f64 = t.parse().map_err(|_| bad(t))?;
            let r: f64 = r.parse().map_err(|_| bad(r))?;
            if !t.is_finite() || !r.is_finite() || r < 0.0 {
                return Err(bad(line));
            }
            if samples.last().is_some_and(|&(pt, _)| t <= pt) {
                return Err(TraceError::Parse {
                    path: name.into(),
                    line: i + 1,
                    problem: "times must increase".into(),
                });
            }
            samples.push((t, r));
        }
        if samples.is_empty() {
            return Err(TraceError::Empty { path: name.into() });
        }
        let mut gaps: Vec<f64> = samples.windows(2).map(|w| w[1].0 - w[0].0).collect();
        gaps.sort_by(f64::total_cmp);
        let last_gap = gaps.get(gaps.len() / 2).copied().unwrap_or(1.0);
        let t0 = samples[0].0;
        let mut segments = Vec::new();
        for &(t, mbps) in &samples {
            push_merged(
                &mut segments,
                ((t - t0) * 1e9) as u64,
                mbps * 1e6 / 8.0 * scale,
            );
        }
        let period_ns = ((samples[samples.len() - 1].0 - t0 + last_gap) * 1e9) as u64;
        Ok(RateSchedule {
            segments,
            period_ns,
        })
    }

    /// Mean rate over one period, bytes per second.
    pub fn mean_bytes_per_sec(&self) -> f64 {
        let mut total = 0.0;
        for (i, &(start, rate)) in self.segments.iter().enumerate() {
            let end = self
                .segments
                .get(i + 1)
                .map(|s| s.0)
                .unwrap_or(self.period_ns);
            total += rate * (end - start) as f64 / 1e9;
        }
        total / (self.period_ns as f64 / 1e9)
    }

    /// The segment holding time `t` (within a period) and where it ends.
    fn at(&self, t: u64) -> (f64, u64) {
        let i = match self.segments.binary_search_by(|s| s.0.cmp(&t)) {
            Ok(i) => i,
            Err(i) => i.saturating_sub(1),
        };
        let end = self
            .segments
            .get(i + 1)
            .map(|s| s.0)
            .unwrap_or(self.period_ns);
        (self.segments[i].1, end)
    }

    /// Bytes the schedule can carry between `from` and `to` (ns on the
    /// lab's clock).
    pub fn capacity_bytes(&self, from: u64, to: u64) -> f64 {
        let mut t = from;
        let mut total = 0.0;
        while t < to {
            let base = t - t % self.period_ns;
            let (rate, end) = self.at(t % self.period_ns);
            let next = (base + end).min(to).max(t + 1);
            total += rate * (next - t) as f64 / 1e9;
            t = next;
        }
        total
    }

    /// When `bytes` finish being sent if sending starts at `start` (ns on
    /// the lab's clock; the schedule is laid from time 0 and loops).
    pub fn finish(&self, start: u64, bytes: f64) -> u64 {
        let mut t = start;
        let mut left = bytes;
        // Bounded: the trace has capacity, so each period serves something.
        for _ in 0..10_000_000 {
            let base = t - t % self.period_ns;
            let (rate, end) = self.at(t % self.period_ns);
            let span = (base + end).saturating_sub(t).max(1);
            let can = rate * span as f64 / 1e9;
            if can >= left {
                return t + (left / rate * 1e9).ceil() as u64;
            }
            left -= can;
            t += span;
        }
        t
    }
}

fn push_merged(segments: &mut Vec<(u64, f64)>, start: u64, rate: f64) {
    match segments.last() {
        Some(&(_, r)) if r == rate => {}
        _ => segments.push((start, rate)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(f.path(), text).expect("write");
        f
    }

    #[test]
    fn mahimahi_rate_and_loop() {
        // Two packets every ms, looping every 4 ms (ms 4 is ms 0 of the
        // next round): 3000 B/ms = 24 Mbit/s.
        let f = write("1\n1\n2\n2\n3\n3\n4\n4\n");
        let s = RateSchedule::load(f.path(), 1.0).expect("load");
        assert_eq!(s.period_ns, 4 * MS);
        assert!(
            (s.mean_bytes_per_sec() * 8.0 - 24e6).abs() < 1.0,
            "{}",
            s.mean_bytes_per_sec()
        );
        assert_eq!(s.finish(0, 3000.0), MS);
        assert_eq!(s.capacity_bytes(0, 10 * MS), 30_000.0);
        // One packet at ms 2 and one at ms 4 (= ms 0): ms 1 and 3 are empty,
        // so 1500 bytes offered at ms 1 go out during ms 2.
        let s = RateSchedule::load(write("2\n4\n").path(), 1.0).expect("load");
        assert_eq!(s.finish(MS, 1500.0), 3 * MS);
        assert_eq!(s.finish(3 * MS, 1500.0), 5 * MS);
    }

    #[test]
    fn columns_scale_and_reject_bad_files() {
        let f = write("0\t1.0\n1\t2.0\n2\t0\n");
        let s = RateSchedule::load(f.path(), 100.0).expect("load");
        assert_eq!(s.period_ns, 3_000_000_000);
        // 100 + 200 + 0 Mbit over 3 s.
        assert!((s.mean_bytes_per_sec() * 8.0 - 100e6).abs() < 1.0);
        // The 0 Mbit/s second is skipped over.
        let t = s.finish(2_000_000_000, 1250.0);
        assert!(t > 3_000_000_000 && t < 3_000_200_000, "{t}");
        assert!(RateSchedule::load(write("0 0\n1 0\n").path(), 1.0).is_err());
        assert!(RateSchedule::load(write("0 x\n").path(), 1.0).is_err());
        assert!(RateSchedule::load(write("5\n3\n").path(), 1.0).is_err());
        assert!(RateSchedule::load(Path::new("/nonexistent/trace"), 1.0).is_err());
    }

    #[test]
    fn real_traces_load() {
        // The traces live in shared/ beside the repository (as in CI), or
        // wherever DWCP_TRACES points.
        let dir = std::env::var_os("DWCP_TRACES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/traces")
            });
        for (f, lo, hi) in [
            ("mahimahi/Verizon-LTE-short.down", 1e6, 100e6),
            ("pensieve_norway_hsdpa/norway_bus_1", 0.1e6, 20e6),
            (
                "pensieve_fcc/trace_10322_http---edition.cnn.com",
                0.1e6,
                100e6,
            ),
        ] {
            let p = dir.join(f);
            let s = RateSchedule::load(&p, 1.0).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let mbit = s.mean_bytes_per_sec() * 8.0;
            assert!((lo..hi).contains(&mbit), "{f}: mean {mbit} bit/s");
        }
    }
}
