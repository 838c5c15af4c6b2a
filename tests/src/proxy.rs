//! A fault-injecting TCP proxy on 127.0.0.1: it forwards one peer's connections to another
//! and cuts each connection after a set number of bytes, as a flaky satellite link would.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

/// Bytes copied per read while forwarding.
const PROXY_CHUNK_BYTES: usize = 64 * 1024;

/// A running proxy; it stops when dropped.
pub struct FlakyProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    cuts: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl FlakyProxy {
    /// Forward connections to `target`, cutting each once `cut_after_bytes` have crossed it
    /// (both ways together).
    pub fn start(target: SocketAddr, cut_after_bytes: u64) -> FlakyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listens");
        let addr = listener.local_addr().expect("proxy address");
        let stop = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (s, c, n, b) = (
            Arc::clone(&stop),
            Arc::clone(&cuts),
            Arc::clone(&connections),
            Arc::clone(&bytes),
        );
        thread::spawn(move || {
            for inbound in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let (Ok(inbound), Ok(outbound)) = (inbound, TcpStream::connect(target)) else {
                    continue;
                };
                n.fetch_add(1, Ordering::SeqCst);
                let crossed = Arc::new(AtomicU64::new(0));
                let cut = Arc::new(AtomicBool::new(false));
                for (from, to) in [
                    (inbound.try_clone(), outbound.try_clone()),
                    (outbound.try_clone(), inbound.try_clone()),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else {
                        continue;
                    };
                    let (crossed, cut, cuts, total) = (
                        Arc::clone(&crossed),
                        Arc::clone(&cut),
                        Arc::clone(&c),
                        Arc::clone(&b),
                    );
                    thread::spawn(move || {
                        forward(from, to, cut_after_bytes, &crossed, &cut, &cuts, &total)
                    });
                }
            }
        });
        FlakyProxy {
            addr,
            stop,
            cuts,
            connections,
            bytes,
        }
    }

    /// The proxy's address, to dial instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections it cut.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::SeqCst)
    }

    /// Bytes it forwarded, both ways, all connections together.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Connections it forwarded.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copy `from` to `to` until either closes, or until the connection has carried `limit`
/// bytes: then both directions are shut, once, and the cut counted.
fn forward(
    mut from: TcpStream,
    mut to: TcpStream,
    limit: u64,
    crossed: &AtomicU64,
    cut: &AtomicBool,
    cuts: &AtomicU64,
    forwarded: &AtomicU64,
) {
    let mut buf = vec![0u8; PROXY_CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let total = crossed.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        if total >= limit {
            if !cut.swap(true, Ordering::SeqCst) {
                cuts.fetch_add(1, Ordering::SeqCst);
            }
            break;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        forwarded.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
