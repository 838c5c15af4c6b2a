//! A fault-injecting TCP proxy on 127.0.0.1: it forwards one peer's connections to another,
//! as a thin, flaky satellite link would: each direction at a set rate and one-way delay, and
//! each connection cut after a set number of bytes or seconds (what was in flight is lost).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Bytes read at once while forwarding: small enough that the rate is paced smoothly.
const PROXY_CHUNK_BYTES: usize = 16 * 1024;
/// Chunks in flight on one direction of a connection (read, not yet written): the delay line.
const PROXY_CHUNKS_IN_FLIGHT: usize = 1_024;
/// How often a reader with nothing to read checks whether its connection's time is up.
const PROXY_POLL: Duration = Duration::from_millis(50);

/// What the link does to every connection. The default forwards as fast as it can, forever.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    /// Cut a connection once this many bytes crossed it (both ways together).
    pub cut_after_bytes: Option<u64>,
    /// Cut a connection once it is this old.
    pub cut_after: Option<Duration>,
    /// Bytes a second each direction carries.
    pub rate_bytes_per_sec: Option<u64>,
    /// Time each byte takes from one end to the other (half the round trip).
    pub one_way_delay: Duration,
}

/// A running proxy; it stops when dropped.
pub struct FlakyProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    cuts: AtomicU64,
    connections: AtomicU64,
    bytes: AtomicU64,
}

/// One connection's state, shared by its two directions.
struct Conn {
    started: Instant,
    crossed: AtomicU64,
    cut: AtomicBool,
}

impl FlakyProxy {
    /// Forward connections to `target`, cutting each once `cut_after_bytes` have crossed it
    /// (both ways together).
    pub fn start(target: SocketAddr, cut_after_bytes: u64) -> FlakyProxy {
        FlakyProxy::shaped(
            target,
            Shape {
                cut_after_bytes: Some(cut_after_bytes),
                ..Shape::default()
            },
        )
    }

    /// Forward connections to `target` through a link of `shape`.
    pub fn shaped(target: SocketAddr, shape: Shape) -> FlakyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listens");
        let addr = listener.local_addr().expect("proxy address");
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (s, c) = (Arc::clone(&stop), Arc::clone(&counters));
        thread::spawn(move || {
            for inbound in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let (Ok(inbound), Ok(outbound)) = (inbound, TcpStream::connect(target)) else {
                    continue;
                };
                c.connections.fetch_add(1, Ordering::SeqCst);
                let conn = Arc::new(Conn {
                    started: Instant::now(),
                    crossed: AtomicU64::new(0),
                    cut: AtomicBool::new(false),
                });
                for (from, to) in [
                    (inbound.try_clone(), outbound.try_clone()),
                    (outbound.try_clone(), inbound.try_clone()),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else {
                        continue;
                    };
                    direction(from, to, shape, Arc::clone(&conn), Arc::clone(&c));
                }
            }
        });
        FlakyProxy {
            addr,
            stop,
            counters,
        }
    }

    /// The proxy's address, to dial instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections it cut.
    pub fn cuts(&self) -> u64 {
        self.counters.cuts.load(Ordering::SeqCst)
    }

    /// Bytes it forwarded, both ways, all connections together.
    pub fn bytes(&self) -> u64 {
        self.counters.bytes.load(Ordering::SeqCst)
    }

    /// Connections it forwarded.
    pub fn connections(&self) -> u64 {
        self.counters.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

impl Conn {
    /// Cut the connection (once, counted): both directions stop and what is in flight is lost.
    fn cut(&self, counters: &Counters) {
        if !self.cut.swap(true, Ordering::SeqCst) {
            counters.cuts.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Whether `shape` says the connection's time or bytes are up (and cut it if so).
    fn over(&self, shape: &Shape, counters: &Counters) -> bool {
        let old = shape
            .cut_after
            .is_some_and(|age| self.started.elapsed() >= age);
        let full = shape
            .cut_after_bytes
            .is_some_and(|limit| self.crossed.load(Ordering::SeqCst) >= limit);
        if old || full {
            self.cut(counters);
        }
        self.cut.load(Ordering::SeqCst)
    }
}

/// One direction of a connection: a reader that timestamps each chunk with when it would
/// arrive (after the ones before it have gone out at the link's rate, plus the delay), and a
/// writer that hands it on then.
fn direction(
    mut from: TcpStream,
    mut to: TcpStream,
    shape: Shape,
    conn: Arc<Conn>,
    counters: Arc<Counters>,
) {
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(PROXY_CHUNKS_IN_FLIGHT);
    let (rconn, rcounters) = (Arc::clone(&conn), Arc::clone(&counters));
    thread::spawn(move || {
        let _ = from.set_read_timeout(Some(PROXY_POLL));
        let mut buf = vec![0u8; PROXY_CHUNK_BYTES];
        let mut line_free = Instant::now();
        loop {
            if rconn.over(&shape, &rcounters) {
                break;
            }
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue;
                }
                Err(_) => break,
            };
            rconn.crossed.fetch_add(n as u64, Ordering::SeqCst);
            if rconn.over(&shape, &rcounters) {
                break;
            }
            let on_line = match shape.rate_bytes_per_sec {
                Some(rate) if rate > 0 => Duration::from_secs_f64(n as f64 / rate as f64),
                _ => Duration::ZERO,
            };
            line_free = line_free.max(Instant::now()) + on_line;
            if tx
                .send((line_free + shape.one_way_delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Both);
    });
    thread::spawn(move || {
        for (due, chunk) in rx {
            let wait = due.saturating_duration_since(Instant::now());
            thread::sleep(wait);
            if conn.cut.load(Ordering::SeqCst) || to.write_all(&chunk).is_err() {
                break;
            }
            counters
                .bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}
