//! The Linux plumbing: network namespaces (through iproute2's `ip`), TUN
//! devices opened inside them, and per-namespace sysctls.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot run `ip` (is iproute2 installed?)")]
    NoIp(#[source] io::Error),
    #[error("cannot enter network namespace {ns}")]
    Setns {
        ns: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create TUN device {name} (are you root? is /dev/net/tun there?)")]
    Tun {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Runs `ip ARGS`.
pub fn ip(args: &[&str]) -> Result<(), SysError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(SysError::NoIp)?;
    if !out.status.success() {
        return Err(SysError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Names of all named network namespaces.
pub fn netns_list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `f` on a fresh thread that has entered namespace `ns`, so the
/// caller's own namespace is never changed.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SysError> {
    let path = Path::new("/run/netns").join(ns);
    let ns_name = ns.to_owned();
    let handle = std::thread::spawn(move || -> Result<T, SysError> {
        let file = std::fs::File::open(&path).map_err(|source| SysError::Setns {
            ns: ns_name.clone(),
            source,
        })?;
        // SAFETY: setns on a valid namespace fd; affects only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(SysError::Setns {
                ns: ns_name,
                source: io::Error::last_os_error(),
            });
        }
        Ok(f())
    });
    handle.join().unwrap_or_else(|_| {
        Err(SysError::Setns {
            ns: ns.to_owned(),
            source: io::Error::other("the namespace thread panicked"),
        })
    })
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates TUN device `name` in the calling thread's network namespace and
/// returns its (non-blocking) file descriptor. The device lives as long as
/// the descriptor.
pub fn open_tun(name: &str) -> Result<OwnedFd, SysError> {
    let err = |source| SysError::Tun {
        name: name.to_owned(),
        source,
    };
    if name.len() >= libc::IFNAMSIZ {
        return Err(err(io::Error::other("name too long")));
    }
    let path = CString::new("/dev/net/tun").map_err(|e| err(io::Error::other(e)))?;
    // SAFETY: open(2) with a valid C string.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI,
        _pad: [0; 22],
    };
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
    if unsafe { libc::ioctl(fd, TUNSETIFF, &mut req) } < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(owned)
}

/// Writes a sysctl of the calling thread's network namespace
/// (`net.ipv4.tcp_rmem` → /proc/sys/net/ipv4/tcp_rmem).
pub fn sysctl(key: &str, value: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/{}", key.replace('.', "/")), value)
}

/// Puts the calling thread in the lowest real-time class (SCHED_RR, 1):
/// it runs as soon as it wakes, before any ordinary process. For the
/// emulator's threads, which stand in for a wire that does not share the
/// CPU with the hosts at its ends: without it, two busy QEMUs on two cores
/// added tens of milliseconds to an 80 ms RTT. They only ever block on
/// poll or a timed wait, and the kernel keeps 5 % of each second for
/// ordinary work whatever they do. False where this is not allowed.
pub fn realtime_thread() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pid 0 is the calling thread; param is a valid sched_param.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &param) == 0 }
}

/// Waits up to `timeout_ms` for `fd` to be readable.
pub fn poll_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    n > 0 && (p.revents & libc::POLLIN) != 0
}

/// read(2) into `buf`; `Ok(None)` when nothing is waiting.
pub fn read_packet(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(n as usize))
}

/// write(2) of one whole packet.
pub fn write_packet(fd: RawFd, pkt: &[u8]) -> io::Result<()> {
    // SAFETY: pkt is valid for reads of its length.
    let n = unsafe { libc::write(fd, pkt.as_ptr().cast(), pkt.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// CPU time (user + system) this process has used, in seconds.
pub fn process_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / hz.max(1.0))
}
