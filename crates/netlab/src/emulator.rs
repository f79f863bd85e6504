//! The forwarding engine: one reader thread per host pulls packets from its
//! TUN device and runs them through the [`LinkModel`] of the (source,
//! destination) direction; one delivery thread per direction writes them
//! into the destination's TUN device when their time comes.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::model::{LinkModel, Verdict};
use crate::params::LinkParams;
use crate::sys;
use crate::trace::RateSchedule;

/// Most packets written in one wake-up of a delivery thread.
const DELIVERY_BATCH: usize = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct Counters {
    arrived_packets: AtomicU64,
    arrived_bytes: AtomicU64,
    delivered_packets: AtomicU64,
    delivered_bytes: AtomicU64,
    lost_packets: AtomicU64,
    lost_bytes: AtomicU64,
    queue_drop_packets: AtomicU64,
    queue_drop_bytes: AtomicU64,
    write_errors: AtomicU64,
}

/// Counters and settings of one direction of one link.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LinkStats {
    pub from: String,
    pub to: String,
    pub settings: String,
    pub queue_limit_bytes: u64,
    pub arrived_packets: u64,
    pub arrived_bytes: u64,
    pub delivered_packets: u64,
    pub delivered_bytes: u64,
    pub lost_packets: u64,
    pub lost_bytes: u64,
    pub queue_drop_packets: u64,
    pub queue_drop_bytes: u64,
    /// Packets queued or in flight right now.
    pub held_packets: u64,
    pub write_errors: u64,
}

struct Link {
    from: usize,
    to: usize,
    model: Mutex<LinkModel>,
    line: Mutex<VecDeque<(u64, Vec<u8>)>>,
    wake: Condvar,
    held: AtomicUsize,
    counters: Counters,
}

/// One end of the lab: a host's TUN device and address.
pub struct Port {
    pub name: String,
    pub addr: Ipv4Addr,
    pub tun: OwnedFd,
}

struct Shared {
    start: Instant,
    stop: AtomicBool,
    ports: Vec<Port>,
    links: Vec<Link>,
    unroutable: AtomicU64,
}

impl Shared {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    fn link(&self, from: usize, to: usize) -> &Link {
        &self.links[from * self.ports.len() + to]
    }
}

pub struct Emulator {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// Settings of one direction, with its trace already loaded.
pub type Settings = (LinkParams, Option<RateSchedule>);

impl Emulator {
    /// Starts forwarding between `ports`; `settings(from, to)` gives each
    /// direction's settings.
    pub fn start(
        ports: Vec<Port>,
        seed: u64,
        mut settings: impl FnMut(usize, usize) -> Settings,
    ) -> Emulator {
        let n = ports.len();
        let mut links = Vec::with_capacity(n * n);
        for from in 0..n {
            for to in 0..n {
                let (params, trace) = if from == to {
                    (LinkParams::default(), None)
                } else {
                    settings(from, to)
                };
                links.push(Link {
                    from,
                    to,
                    model: Mutex::new(LinkModel::new(
                        params,
                        trace,
                        seed ^ ((from * n + to) as u64 * 0x9e37),
                    )),
                    line: Mutex::new(VecDeque::new()),
                    wake: Condvar::new(),
                    held: AtomicUsize::new(0),
                    counters: Counters::default(),
                });
            }
        }
        let shared = Arc::new(Shared {
            start: Instant::now(),
            stop: AtomicBool::new(false),
            ports,
            links,
            unroutable: AtomicU64::new(0),
        });
        let mut threads = Vec::new();
        for i in 0..n {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("netlab-rx-{i}"))
                    .spawn(move || reader(&s, i))
                    .ok(),
            );
        }
        for from in 0..n {
            for to in 0..n {
                if from != to {
                    let s = shared.clone();
                    threads.push(
                        std::thread::Builder::new()
                            .name(format!("netlab-tx-{from}-{to}"))
                            .spawn(move || deliverer(&s, from, to))
                            .ok(),
                    );
                }
            }
        }
        Emulator {
            shared,
            threads: threads.into_iter().flatten().collect(),
        }
    }

    pub fn hosts(&self) -> impl Iterator<Item = &Port> {
        self.shared.ports.iter()
    }

    /// Changes one direction's settings for packets arriving from now on.
    pub fn set(&self, from: usize, to: usize, settings: Settings) {
        if from != to && from < self.shared.ports.len() && to < self.shared.ports.len() {
            lock(&self.shared.link(from, to).model).set_params(settings.0, settings.1);
        }
    }

    /// Every direction's trace plays from its start from now on.
    pub fn restart_traces(&self) {
        let now = self.shared.now();
        for link in &self.shared.links {
            lock(&link.model).restart_trace(now);
        }
    }

    pub fn params(&self, from: usize, to: usize) -> LinkParams {
        lock(&self.shared.link(from, to).model).params().clone()
    }

    pub fn stats(&self) -> Vec<LinkStats> {
        let s = &self.shared;
        s.links
            .iter()
            .filter(|l| l.from != l.to)
            .map(|l| {
                let m = lock(&l.model);
                let c = &l.counters;
                let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
                LinkStats {
                    from: s.ports[l.from].name.clone(),
                    to: s.ports[l.to].name.clone(),
                    settings: m.params().describe(),
                    queue_limit_bytes: m.queue_limit_bytes(),
                    arrived_packets: g(&c.arrived_packets),
                    arrived_bytes: g(&c.arrived_bytes),
                    delivered_packets: g(&c.delivered_packets),
                    delivered_bytes: g(&c.delivered_bytes),
                    lost_packets: g(&c.lost_packets),
                    lost_bytes: g(&c.lost_bytes),
                    queue_drop_packets: g(&c.queue_drop_packets),
                    queue_drop_bytes: g(&c.queue_drop_bytes),
                    held_packets: l.held.load(Ordering::Relaxed) as u64,
                    write_errors: g(&c.write_errors),
                }
            })
            .collect()
    }

    /// Packets that matched no host of the lab.
    pub fn unroutable(&self) -> u64 {
        self.shared.unroutable.load(Ordering::Relaxed)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for l in &self.shared.links {
            l.wake.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn reader(s: &Shared, from: usize) {
    sys::realtime_thread();
    let fd = s.ports[from].tun.as_raw_fd();
    let mut buf = vec![0u8; 65536];
    while !s.stop.load(Ordering::Relaxed) {
        if !sys::poll_readable(fd, 100) {
            continue;
        }
        loop {
            let n = match sys::read_packet(fd, &mut buf) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            };
            let pkt = &buf[..n];
            let dest = (n >= 20 && pkt[0] >> 4 == 4)
                .then(|| Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]))
                .and_then(|d| s.ports.iter().position(|p| p.addr == d))
                .filter(|&to| to != from);
            let Some(to) = dest else {
                s.unroutable.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let link = s.link(from, to);
            let c = &link.counters;
            c.arrived_packets.fetch_add(1, Ordering::Relaxed);
            c.arrived_bytes.fetch_add(n as u64, Ordering::Relaxed);
            let verdict =
                lock(&link.model).on_packet(s.now(), n, link.held.load(Ordering::Relaxed));
            match verdict {
                Verdict::Lost => {
                    c.lost_packets.fetch_add(1, Ordering::Relaxed);
                    c.lost_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Verdict::QueueFull => {
                    c.queue_drop_packets.fetch_add(1, Ordering::Relaxed);
                    c.queue_drop_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Verdict::Deliver(at) => {
                    let mut line = lock(&link.line);
                    let was_empty = line.is_empty();
                    line.push_back((at, pkt.to_vec()));
                    link.held.fetch_add(1, Ordering::Relaxed);
                    drop(line);
                    if was_empty {
                        link.wake.notify_one();
                    }
                }
            }
        }
    }
}

fn deliverer(s: &Shared, from: usize, to: usize) {
    sys::realtime_thread();
    let link = s.link(from, to);
    let fd = s.ports[to].tun.as_raw_fd();
    let mut batch = Vec::with_capacity(DELIVERY_BATCH);
    loop {
        {
            let mut line = lock(&link.line);
            loop {
                if s.stop.load(Ordering::Relaxed) {
                    return;
                }
                let now = s.now();
                match line.front() {
                    None => {
                        line = link
                            .wake
                            .wait_timeout(line, Duration::from_millis(100))
                            .map(|r| r.0)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    Some(&(at, _)) if at > now => {
                        line = link
                            .wake
                            .wait_timeout(line, Duration::from_nanos(at - now))
                            .map(|r| r.0)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    Some(_) => {
                        while batch.len() < DELIVERY_BATCH
                            && line.front().is_some_and(|f| f.0 <= now)
                        {
                            if let Some((_, p)) = line.pop_front() {
                                batch.push(p);
                            }
                        }
                        break;
                    }
                }
            }
        }
        let c = &link.counters;
        for p in batch.drain(..) {
            link.held.fetch_sub(1, Ordering::Relaxed);
            match sys::write_packet(fd, &p) {
                Ok(()) => {
                    c.delivered_packets.fetch_add(1, Ordering::Relaxed);
                    c.delivered_bytes
                        .fetch_add(p.len() as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    c.write_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
