//! Link parameters and how they are written: `100mbit`, `50ms`, `1%`,
//! `256kb`, and `key=value` assignments shared by flags, `--link` overrides,
//! `netlab set` and the TOML file.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A bandwidth trace to replay as the link's rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceSpec {
    pub path: PathBuf,
    /// Multiplies the trace's rates (old consumer traces x100 reach the
    /// 100-1000 Mbit/s range).
    pub scale: f64,
}

/// How one direction of one link behaves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkParams {
    /// Bits per second; `None` is as fast as the emulator can forward.
    pub rate_bps: Option<u64>,
    /// One-way propagation delay.
    pub delay: Duration,
    /// Each packet's delay varies by up to this much either way; packets are
    /// never reordered by it.
    pub jitter: Duration,
    /// Average loss probability, 0 to 1.
    pub loss: f64,
    /// Mean loss burst length in packets (Gilbert-Elliott); 1 is independent
    /// (Bernoulli) loss.
    pub burst: f64,
    /// Tail-drop queue limit; `None` is 1.5 x the bandwidth-delay product
    /// (rate x 2 x delay), at least 64 KiB.
    pub queue_bytes: Option<u64>,
    /// Replay a trace instead of a constant rate.
    pub trace: Option<TraceSpec>,
}

impl Default for LinkParams {
    fn default() -> Self {
        LinkParams {
            rate_bps: None,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            burst: 1.0,
            queue_bytes: None,
            trace: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{key}={value}: {problem}")]
pub struct ParamError {
    pub key: String,
    pub value: String,
    pub problem: String,
}

pub const KEYS: &str = "rate, delay, jitter, loss, burst, queue, trace, trace-scale";

/// Splits `2.5mbit` into 2.5 and `mbit` (lower-cased, trimmed).
fn number_and_unit(s: &str, example: &str) -> Result<(f64, String), String> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("not a {example}"))?;
    Ok((v, unit.to_owned()))
}

/// Parses `100mbit`, `1gbit`, `500kbit`, `2.5mbps` (bits, decimal units) or
/// `none`/`unlimited`.
pub fn parse_rate(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "none" || t == "unlimited" {
        return Ok(None);
    }
    let (v, unit) = number_and_unit(&t, "rate (examples: 100mbit, 1gbit)")?;
    let mult = match unit.as_str() {
        "bit" | "bps" | "" => 1e0,
        "kbit" | "kbps" => 1e3,
        "mbit" | "mbps" => 1e6,
        "gbit" | "gbps" => 1e9,
        _ => return Err(format!("unknown unit {unit:?} (use kbit, mbit or gbit)")),
    };
    let bps = v * mult;
    if !(1e3..=100e9).contains(&bps) {
        return Err("out of range (1kbit to 100gbit)".into());
    }
    Ok(Some(bps as u64))
}

/// Parses `50ms`, `0.5s`, `200us`, `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim().to_ascii_lowercase();
    let (v, unit) = number_and_unit(&t, "duration (examples: 50ms, 1s)")?;
    let secs = match unit.as_str() {
        "s" => v,
        "ms" => v / 1e3,
        "us" => v / 1e6,
        "" if v == 0.0 => 0.0,
        _ => return Err(format!("unknown unit {unit:?} (use s, ms or us)")),
    };
    if !(0.0..=60.0).contains(&secs) {
        return Err("out of range (0 to 60 s)".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `1%`, `0.5%` or a fraction `0.01`.
pub fn parse_loss(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| "not a loss rate (examples: 1%, 0.01)".to_owned())?;
    // 100 %: the link is cut (tests of what a cut does).
    if !(0.0..=1.0).contains(&v) {
        return Err("out of range (0 to 100%)".into());
    }
    Ok(v)
}

/// Parses byte sizes: `256kb`, `1mb`, `64000` (decimal units, and KiB/MiB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let (v, unit) = number_and_unit(&t, "size (examples: 256kb, 1mb)")?;
    let mult = match unit.as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "kib" => 1024.0,
        "mb" | "m" => 1e6,
        "mib" => 1048576.0,
        "gb" | "g" => 1e9,
        _ => return Err(format!("unknown unit {unit:?} (use b, kb, mb or gb)")),
    };
    let b = v * mult;
    if !(1500.0..=4e9).contains(&b) {
        return Err("out of range (1500 bytes to 4 GB)".into());
    }
    Ok(b as u64)
}

impl LinkParams {
    /// Applies one `key=value` assignment.
    pub fn apply(&mut self, key: &str, value: &str) -> Result<(), ParamError> {
        let err = |problem: String| ParamError {
            key: key.to_owned(),
            value: value.to_owned(),
            problem,
        };
        match key {
            "rate" => self.rate_bps = parse_rate(value).map_err(err)?,
            "delay" => self.delay = parse_duration(value).map_err(err)?,
            "jitter" => self.jitter = parse_duration(value).map_err(err)?,
            "loss" => self.loss = parse_loss(value).map_err(err)?,
            "burst" => {
                let b: f64 = value.parse().map_err(|_| err("not a number".into()))?;
                if !(1.0..=10_000.0).contains(&b) {
                    return Err(err("mean burst length must be 1 to 10000 packets".into()));
                }
                self.burst = b;
            }
            "queue" => {
                self.queue_bytes = if value == "auto" {
                    None
                } else {
                    Some(parse_size(value).map_err(err)?)
                }
            }
            "trace" => {
                self.trace = if value == "none" {
                    None
                } else {
                    let scale = self.trace.as_ref().map(|t| t.scale).unwrap_or(1.0);
                    Some(TraceSpec {
                        path: PathBuf::from(value),
                        scale,
                    })
                }
            }
            "trace-scale" | "trace_scale" => {
                let s: f64 = value.parse().map_err(|_| err("not a number".into()))?;
                if !(s > 0.0 && s <= 1e6) {
                    return Err(err("must be above 0".into()));
                }
                match &mut self.trace {
                    Some(t) => t.scale = s,
                    None => return Err(err("give trace= before trace-scale=".into())),
                }
            }
            _ => return Err(err(format!("unknown setting (known: {KEYS})"))),
        }
        Ok(())
    }

    /// Applies `key=value,key=value`.
    pub fn apply_list(&mut self, list: &str) -> Result<(), ParamError> {
        for item in list.split(',').filter(|s| !s.trim().is_empty()) {
            let (k, v) = item.split_once('=').ok_or_else(|| ParamError {
                key: item.to_owned(),
                value: String::new(),
                problem: "expected key=value".into(),
            })?;
            self.apply(k.trim(), v.trim())?;
        }
        Ok(())
    }

    /// The queue limit in force: the configured one, or 1.5 x BDP.
    pub fn queue_limit_bytes(&self, mean_rate_bps: Option<f64>) -> u64 {
        if let Some(q) = self.queue_bytes {
            return q;
        }
        let Some(rate) = mean_rate_bps else {
            return u64::MAX;
        };
        let bdp = rate / 8.0 * 2.0 * self.delay.as_secs_f64();
        ((1.5 * bdp) as u64).max(64 * 1024)
    }

    /// One line for logs and `netlab stats`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match (&self.trace, self.rate_bps) {
            (Some(t), _) => parts.push(format!("trace {} x{}", t.path.display(), t.scale)),
            (None, Some(r)) => parts.push(format!("{} Mbit/s", r as f64 / 1e6)),
            (None, None) => parts.push("unlimited".into()),
        }
        parts.push(format!("delay {:?}", self.delay));
        if !self.jitter.is_zero() {
            parts.push(format!("jitter {:?}", self.jitter));
        }
        if self.loss > 0.0 {
            if self.burst > 1.0 {
                parts.push(format!(
                    "loss {}% in bursts of {}",
                    self.loss * 100.0,
                    self.burst
                ));
            } else {
                parts.push(format!("loss {}%", self.loss * 100.0));
            }
        }
        if let Some(q) = self.queue_bytes {
            parts.push(format!("queue {q} B"));
        }
        parts.join(", ")
    }
}

/// Which directions a `--link` override applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// From the first host named to the second.
    Up,
    /// From the second host named to the first.
    Down,
    Both,
}

/// `h1-h2[:up|:down]:key=value,...`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkOverride {
    pub a: String,
    pub b: String,
    pub direction: Direction,
    pub settings: Vec<(String, String)>,
}

impl std::str::FromStr for LinkOverride {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || {
            format!(
                "{s:?}: expected HOST-HOST[:up|:down]:key=value,... (e.g. h1-h2:up:rate=20mbit)"
            )
        };
        let (hosts, rest) = s.split_once(':').ok_or_else(usage)?;
        let (a, b) = hosts.split_once('-').ok_or_else(usage)?;
        let (direction, settings) = match rest.split_once(':') {
            Some(("up", r)) => (Direction::Up, r),
            Some(("down", r)) => (Direction::Down, r),
            Some(("both", r)) => (Direction::Both, r),
            _ => (Direction::Both, rest),
        };
        let mut pairs = Vec::new();
        for item in settings.split(',').filter(|x| !x.is_empty()) {
            let (k, v) = item.split_once('=').ok_or_else(usage)?;
            pairs.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        if pairs.is_empty() || a.is_empty() || b.is_empty() {
            return Err(usage());
        }
        // Check the settings now, so a bad one fails before anything starts.
        let mut probe = LinkParams::default();
        for (k, v) in &pairs {
            probe.apply(k, v).map_err(|e| e.to_string())?;
        }
        Ok(LinkOverride {
            a: a.to_owned(),
            b: b.to_owned(),
            direction,
            settings: pairs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse() {
        assert_eq!(parse_rate("100mbit"), Ok(Some(100_000_000)));
        assert_eq!(parse_rate("1gbit"), Ok(Some(1_000_000_000)));
        assert_eq!(parse_rate("none"), Ok(None));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("100furlongs").is_err());
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("50").is_err());
        assert!(parse_duration("-5ms").is_err());
        assert_eq!(parse_loss("1%"), Ok(0.01));
        assert_eq!(parse_loss("0.02"), Ok(0.02));
        assert_eq!(parse_loss("100%"), Ok(1.0));
        assert!(parse_loss("101%").is_err());
        assert!(parse_loss("-1%").is_err());
        assert_eq!(parse_size("256kb"), Ok(256_000));
        assert!(parse_size("12").is_err());
    }

    #[test]
    fn overrides_parse_and_check_settings() {
        let o: LinkOverride = "h1-h2:up:rate=20mbit,delay=10ms".parse().expect("parses");
        assert_eq!(
            (o.a.as_str(), o.b.as_str(), o.direction),
            ("h1", "h2", Direction::Up)
        );
        assert_eq!(o.settings.len(), 2);
        let o: LinkOverride = "a-b:loss=2%".parse().expect("parses");
        assert_eq!(o.direction, Direction::Both);
        assert!("h1h2:rate=1mbit".parse::<LinkOverride>().is_err());
        assert!("h1-h2:up:rate=fast".parse::<LinkOverride>().is_err());
        assert!("h1-h2:up:colour=red".parse::<LinkOverride>().is_err());
    }

    #[test]
    fn auto_queue_is_one_and_a_half_bdp() {
        let mut p = LinkParams::default();
        p.apply_list("rate=100mbit,delay=50ms").expect("ok");
        // 100 Mbit/s x 100 ms RTT = 1.25 MB; x 1.5.
        assert_eq!(p.queue_limit_bytes(Some(100e6)), 1_875_000);
        p.apply("queue", "100kb").expect("ok");
        assert_eq!(p.queue_limit_bytes(Some(100e6)), 100_000);
    }
}
