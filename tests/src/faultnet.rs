//! A fault-injecting TCP proxy for the harness: it sits between an agent and the collector and,
//! per connection, passes bytes through, delays them, refuses the connection, answers with
//! garbage (a failed TLS handshake), resets or truncates the stream part-way through a
//! request, swallows the answer to a request the collector did process, or blackholes the
//! connection. Which fault a connection gets is drawn from a seeded [`Rng`], so a schedule can
//! be replayed; [`FaultNet::injected`] counts what was done.
//!
//! Threads and blocking sockets only: it is test plumbing, and it must keep working while the
//! processes on either side are killed and restarted.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// splitmix64: small, seedable, good enough to draw fault schedules.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next_u64() % (hi - lo)
        }
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// What happens to one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Bytes pass both ways unchanged.
    Pass,
    /// Every chunk, both ways, waits this long first.
    Delay(Duration),
    /// Closed with a reset as soon as it is accepted.
    Refuse,
    /// Answered with bytes that are not TLS, then closed: the handshake fails.
    Garbage,
    /// After this many bytes from the client, both sides are reset.
    ResetAfter(usize),
    /// After this many bytes from the client, the upstream side sees end of stream and the
    /// client's side is closed: a truncated request.
    TruncateAfter(usize),
    /// Requests reach the collector, its answers never reach the client: the connection is
    /// reset when the first answer byte arrives. The agent must retry, the collector must
    /// recognise the resend.
    DropAnswer,
    /// Accepted and read, never forwarded or answered.
    Blackhole,
}

impl Fault {
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Pass => "pass",
            Fault::Delay(_) => "delay",
            Fault::Refuse => "refuse",
            Fault::Garbage => "garbage_handshake",
            Fault::ResetAfter(_) => "reset_mid_stream",
            Fault::TruncateAfter(_) => "truncate",
            Fault::DropAnswer => "drop_answer",
            Fault::Blackhole => "blackhole",
        }
    }
}

/// Which faults new connections get.
#[derive(Clone, Copy, Debug)]
pub enum Policy {
    /// Every connection passes.
    Healthy,
    /// Each connection draws a fault with probability `p` (otherwise it passes).
    Random { p: f64 },
    /// Every connection gets this fault.
    All(Fault),
}

struct Shared {
    target: SocketAddr,
    policy: Mutex<Policy>,
    rng: Mutex<Rng>,
    injected: Mutex<BTreeMap<&'static str, u64>>,
    live: Mutex<BTreeMap<u64, Vec<TcpStream>>>,
    next_conn: AtomicU64,
    stop: AtomicBool,
}

/// The proxy; stops accepting when dropped.
pub struct FaultNet {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FaultNet {
    /// Listens on 127.0.0.1, port 0, forwarding to `target`.
    pub fn start(target: SocketAddr, seed: u64) -> FaultNet {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fault proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            target,
            policy: Mutex::new(Policy::Healthy),
            rng: Mutex::new(Rng::new(seed)),
            injected: Mutex::new(BTreeMap::new()),
            live: Mutex::new(BTreeMap::new()),
            next_conn: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let s = Arc::clone(&s);
                std::thread::spawn(move || handle(s, conn));
            }
        });
        FaultNet { addr, shared }
    }

    /// Sets what new connections get.
    pub fn set(&self, policy: Policy) {
        *self.shared.policy.lock().unwrap() = policy;
    }

    /// Resets every open connection, so the next request opens a new one (and draws anew).
    pub fn cut_all(&self) {
        let live = std::mem::take(&mut *self.shared.live.lock().unwrap());
        for (_, streams) in live {
            for s in streams {
                reset(&s);
            }
        }
    }

    /// How many connections got each fault so far.
    pub fn injected(&self) -> BTreeMap<&'static str, u64> {
        self.shared.injected.lock().unwrap().clone()
    }
}

impl Drop for FaultNet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
        self.cut_all();
    }
}

/// Closes with RST instead of FIN (linger 0).
fn reset(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket this process owns, with a correctly sized linger struct.
    #[allow(unsafe_code)]
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = s.shutdown(Shutdown::Both);
}

fn draw(s: &Shared) -> Fault {
    let policy = *s.policy.lock().unwrap();
    let mut rng = s.rng.lock().unwrap();
    match policy {
        Policy::Healthy => Fault::Pass,
        Policy::All(f) => f,
        Policy::Random { p } => {
            if !rng.chance(p) {
                return Fault::Pass;
            }
            match rng.range(0, 7) {
                0 => Fault::Delay(Duration::from_millis(rng.range(5, 400))),
                1 => Fault::Refuse,
                2 => Fault::Garbage,
                3 => Fault::ResetAfter(rng.range(0, 256 * 1024) as usize),
                4 => Fault::TruncateAfter(rng.range(0, 256 * 1024) as usize),
                5 => Fault::DropAnswer,
                _ => Fault::Blackhole,
            }
        }
    }
}

fn handle(s: Arc<Shared>, client: TcpStream) {
    let fault = draw(&s);
    if fault != Fault::Pass {
        *s.injected.lock().unwrap().entry(fault.name()).or_default() += 1;
    }
    let id = s.next_conn.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    match fault {
        Fault::Refuse => return reset(&client),
        Fault::Garbage => {
            let mut c = &client;
            let _ = c.write_all(b"HTTP/1.0 418 not a TLS server\r\n\r\n\x00\x01\x02garbage");
            return reset(&client);
        }
        Fault::Blackhole => {
            register(&s, id, &[&client]);
            let _ = client.set_read_timeout(Some(Duration::from_secs(120)));
            let mut sink = [0u8; 16 * 1024];
            let mut c = &client;
            while matches!(c.read(&mut sink), Ok(n) if n > 0) {}
            s.live.lock().unwrap().remove(&id);
            return;
        }
        _ => {}
    }
    let Ok(upstream) = TcpStream::connect_timeout(&s.target, Duration::from_secs(2)) else {
        return reset(&client);
    };
    let _ = upstream.set_nodelay(true);
    register(&s, id, &[&client, &upstream]);
    let delay = match fault {
        Fault::Delay(d) => Some(d),
        _ => None,
    };
    let (c2, u2) = match (client.try_clone(), upstream.try_clone()) {
        (Ok(c), Ok(u)) => (c, u),
        _ => return,
    };
    // Answers: upstream → client.
    let back = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let (mut from, mut to) = (&u2, &c2);
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if fault == Fault::DropAnswer {
                        reset(&c2);
                        reset(&u2);
                        return;
                    }
                    if let Some(d) = delay {
                        std::thread::sleep(d);
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = c2.shutdown(Shutdown::Write);
    });
    // Requests: client → upstream.
    let mut buf = vec![0u8; 64 * 1024];
    let (mut from, mut to) = (&client, &upstream);
    let mut sent = 0usize;
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(d) = delay {
                    std::thread::sleep(d);
                }
                let cut = match fault {
                    Fault::ResetAfter(limit) | Fault::TruncateAfter(limit) => Some(limit),
                    _ => None,
                };
                if let Some(limit) = cut.filter(|l| sent + n > *l) {
                    let _ = to.write_all(&buf[..limit - sent]);
                    if matches!(fault, Fault::ResetAfter(_)) {
                        reset(&upstream);
                        reset(&client);
                    } else {
                        let _ = upstream.shutdown(Shutdown::Write);
                        let _ = client.shutdown(Shutdown::Both);
                    }
                    break;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                sent += n;
            }
        }
    }
    let _ = upstream.shutdown(Shutdown::Write);
    let _ = back.join();
    s.live.lock().unwrap().remove(&id);
}

fn register(s: &Shared, id: u64, streams: &[&TcpStream]) {
    let clones = streams.iter().filter_map(|t| t.try_clone().ok()).collect();
    s.live.lock().unwrap().insert(id, clones);
}
