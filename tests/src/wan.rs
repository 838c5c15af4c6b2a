//! A wide-area link between two network namespaces that the benchmark creates and removes,
//! shaped packet by packet in user space: each namespace gets a TUN device, and this process
//! carries the IP packets between them at a set rate, one-way delay and loss, with outages.
//! It is what `tc netem` would do, on kernels built without netem (this project's CI and
//! benchmark VMs: `CONFIG_NET_SCH_NETEM` is not set), and since TCP and QUIC both cross it as
//! packets, they meet the same link: the same drops, the same queue, the same outages.
//! Nothing reaches the machine's own network. Needs root, `ip` and `/dev/net/tun`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::netns::ip;

/// `TUNSETIFF`, `_IOW('T', 202, int)` on Linux.
const TUNSETIFF: u64 = 0x4004_54ca;
/// The two ends' addresses, on a point-to-point link inside the namespaces.
pub const WAN_ADDRS: [&str; 2] = ["10.78.0.1", "10.78.0.2"];
/// Largest packet read from a TUN device, in bytes.
const MAX_PACKET_BYTES: usize = 65_536;
/// How often a reader with nothing to read checks whether the link is being removed.
const POLL_MS: i32 = 100;
/// Packets in flight on one direction (read, not yet delivered): the delay line's bound.
const MAX_PACKETS_IN_FLIGHT: usize = 100_000;

/// What the link does to each packet. Each direction has its own rate and queue.
#[derive(Debug, Clone, Copy)]
pub struct WanShape {
    /// Bytes a second each direction carries.
    pub rate_bytes_per_sec: u64,
    /// Time each packet takes from one end to the other, beyond its time on the line.
    pub one_way_delay: Duration,
    /// Fraction of packets lost at random (0.01: one in a hundred).
    pub loss: f64,
    /// Longest a packet may wait for the line; one that would wait longer is dropped (the
    /// modem's queue is full).
    pub max_queue: Duration,
    /// Every this long, the link goes down ...
    pub outage_every: Option<Duration>,
    /// ... for this long: every packet is dropped, both ways.
    pub outage_for: Duration,
    /// Seeds the losses, so that a run can be repeated.
    pub seed: u64,
}

#[derive(Default)]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
}

/// A running link; its namespaces (and so its devices) are removed when dropped.
pub struct Wan {
    prefix: String,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    started: Instant,
    shape: WanShape,
}

/// A TUN device named `name` made inside namespace `ns`: `setns` moves only the calling
/// thread, so a thread of its own enters the namespace, opens the device and ends.
fn tun_in(ns: &str, name: &str) -> io::Result<File> {
    let path = format!("/var/run/netns/{ns}");
    let name = name.to_string();
    thread::spawn(move || {
        let netns = File::open(&path)?;
        // SAFETY: setns on a namespace file we hold open; it affects this thread only.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let tun = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        // struct ifreq: the name (16 bytes), then the flags (a short), then padding.
        let mut req = [0u8; 40];
        req[..name.len()].copy_from_slice(name.as_bytes());
        let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which outlives the call.
        if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, req.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(tun)
    })
    .join()
    .expect("the TUN thread")
}

impl Wan {
    /// Two namespaces joined by a link of `shape`.
    pub fn new(shape: WanShape) -> Wan {
        let prefix = format!("tw{}", std::process::id() % 100_000);
        let wan = Wan {
            prefix,
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::new(Counters::default()),
            started: Instant::now(),
            shape,
        };
        wan.remove();
        let mut tuns = Vec::new();
        for side in 0..2 {
            let ns = wan.ns(side);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            tuns.push(tun_in(&ns, "wan0").expect("a TUN device in the namespace"));
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                WAN_ADDRS[side],
                "peer",
                WAN_ADDRS[1 - side],
                "dev",
                "wan0",
            ]);
            ip(&["-n", &ns, "link", "set", "wan0", "up"]);
        }
        let (b, a) = (tuns.pop().expect("two"), tuns.pop().expect("two"));
        let (a2, b2) = (
            a.try_clone().expect("clone TUN"),
            b.try_clone().expect("clone TUN"),
        );
        wan.carry(a, b2, 1);
        wan.carry(b, a2, 2);
        wan
    }

    /// The namespace of side 0 or 1.
    pub fn ns(&self, side: usize) -> String {
        format!("{}-{side}", self.prefix)
    }

    /// Packets delivered, both ways.
    pub fn packets(&self) -> u64 {
        self.counters.packets.load(Ordering::SeqCst)
    }

    /// IP bytes delivered, both ways (headers included: what the line carried).
    pub fn bytes(&self) -> u64 {
        self.counters.bytes.load(Ordering::SeqCst)
    }

    /// Packets dropped: lost, over the queue, or in an outage.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::SeqCst)
    }

    /// Outages begun so far.
    pub fn outages(&self) -> u64 {
        let Some(every) = self.shape.outage_every else {
            return 0;
        };
        let first = every.saturating_sub(self.shape.outage_for);
        let t = self.started.elapsed();
        if t < first {
            0
        } else {
            ((t - first).as_secs_f64() / every.as_secs_f64()) as u64 + 1
        }
    }

    /// Move the packets `from` reads to `to`, shaped, on two threads: a reader that gives
    /// each packet the time it would arrive (after the ones before it left at the rate, plus
    /// the delay) or drops it, and a writer that delivers it then.
    fn carry(&self, mut from: File, mut to: File, salt: u64) {
        let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(MAX_PACKETS_IN_FLIGHT);
        let (shape, started) = (self.shape, self.started);
        let (stop, counters) = (Arc::clone(&self.stop), Arc::clone(&self.counters));
        thread::spawn(move || {
            let mut rng = shape.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt | 1;
            let mut buf = vec![0u8; MAX_PACKET_BYTES];
            let mut line_free = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                let mut poll = libc::pollfd {
                    fd: from.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd, valid for the call.
                if unsafe { libc::poll(&mut poll, 1, POLL_MS) } <= 0 {
                    continue;
                }
                let Ok(n) = from.read(&mut buf) else { break };
                let now = Instant::now();
                // xorshift64: enough randomness for losses, and repeatable from the seed.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let lost = (rng >> 11) as f64 / (1u64 << 53) as f64 <= shape.loss;
                let down = shape.outage_every.is_some_and(|every| {
                    let t = now.duration_since(started).as_secs_f64() % every.as_secs_f64();
                    t >= every.saturating_sub(shape.outage_for).as_secs_f64()
                });
                line_free = line_free.max(now);
                let queued = line_free.duration_since(now) > shape.max_queue;
                if lost || down || queued {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                line_free += Duration::from_secs_f64(n as f64 / shape.rate_bytes_per_sec as f64);
                if tx
                    .send((line_free + shape.one_way_delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        });
        let counters = Arc::clone(&self.counters);
        thread::spawn(move || {
            for (due, packet) in rx {
                thread::sleep(due.saturating_duration_since(Instant::now()));
                if to.write_all(&packet).is_err() {
                    continue;
                }
                counters.packets.fetch_add(1, Ordering::Relaxed);
                counters
                    .bytes
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
            }
        });
    }

    fn remove(&self) {
        for side in 0..2 {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(side)])
                .output();
        }
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.remove();
    }
}
