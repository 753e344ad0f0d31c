//! Abuse limits that fit how the service is used: one client cannot take the service for
//! itself (users of the free Caddy download service know why), while the ordinary case, many
//! machines behind one address asking for the same binary, is never refused.
//!
//! - [`Limiter`]: a token bucket per client for requests that *create* work (a new build or
//!   a reopened one). Joining a build in progress and downloading are not counted.
//! - [`Waits`]: how many waiting requests (long-polls, event streams, download waits) a
//!   client may hold open at once, and all clients together.
//!
//! A client is its address; IPv6 clients are counted per /64 (one subscriber's prefix).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The address of the connection a request came on (set per connection by the server;
/// replaced by the forwarded client address behind a trusted proxy).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

/// The unit limits count by: the IPv4 address, or the IPv6 /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match super::access::canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// How many clients a map keeps before it starts forgetting the least recently seen half.
const MAX_CLIENTS: usize = 100_000;

/// Buckets per client. Every check is O(1): buckets live in two generations; when the
/// current one is full, it becomes the old one and the old one is dropped, so memory stays
/// bounded and clients not seen for a generation start again with a full bucket.
#[derive(Debug)]
pub struct Limiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<Generations<(f64, Instant)>>,
}

/// Two generations of a per-client map (see [`Limiter`]).
#[derive(Debug)]
struct Generations<V> {
    current: HashMap<IpAddr, V>,
    old: HashMap<IpAddr, V>,
    cap: usize,
}

impl<V> Generations<V> {
    fn new(cap: usize) -> Self {
        Generations {
            current: HashMap::new(),
            old: HashMap::new(),
            cap: cap.max(2),
        }
    }

    /// The client's entry, moved into the current generation (made by `init` if unknown).
    fn entry(&mut self, client: IpAddr, init: impl FnOnce() -> V) -> &mut V {
        if !self.current.contains_key(&client) {
            let v = self.old.remove(&client).unwrap_or_else(init);
            if self.current.len() >= self.cap / 2 {
                self.old = std::mem::take(&mut self.current);
            }
            self.current.insert(client, v);
        }
        self.current.get_mut(&client).expect("just inserted")
    }

    fn len(&self) -> usize {
        self.current.len() + self.old.len()
    }
}

impl Limiter {
    /// `None` when `per_minute` is 0 (no limit).
    pub fn new(per_minute: u32, burst: u32) -> Option<Limiter> {
        Limiter::with_capacity(per_minute, burst, MAX_CLIENTS)
    }

    fn with_capacity(per_minute: u32, burst: u32, cap: usize) -> Option<Limiter> {
        (per_minute > 0).then(|| Limiter {
            per_second: f64::from(per_minute) / 60.0,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(Generations::new(cap)),
        })
    }

    /// Takes a token for `client`; `Err(wait)` says when the next one is due.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("limiter lock");
        let (tokens, at) = buckets.entry(client_key(client), || (self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.per_second))
        }
    }

    /// Clients remembered now (bounded).
    pub fn clients(&self) -> usize {
        self.buckets.lock().expect("limiter lock").len()
    }
}

/// Open waits per client and in total.
#[derive(Debug)]
pub struct Waits {
    per_client: usize,
    global: usize,
    open: AtomicUsize,
    by_client: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a wait was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitRefused {
    /// This client holds `per_client` waits already.
    Client(usize),
    /// The server holds `global` waits already.
    Server(usize),
}

/// One open wait; dropping it closes it.
#[derive(Debug)]
pub struct WaitGuard {
    waits: Arc<Waits>,
    client: Option<IpAddr>,
    /// The `cbs_waiters` gauge of its kind, while open.
    gauge: Option<cbs_metrics::WaitGauge>,
}

impl WaitGuard {
    /// Counts this wait in the `cbs_waiters` gauge of `kind` while it is open.
    pub fn counted(mut self, kind: &'static str) -> WaitGuard {
        self.gauge = Some(cbs_metrics::metrics().wait(kind));
        self
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        self.waits.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(c) = self.client {
            let mut m = self.waits.by_client.lock().expect("waits lock");
            if let Some(n) = m.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&c);
                }
            }
        }
    }
}

impl Waits {
    /// 0 means no limit (for either).
    pub fn new(per_client: usize, global: usize) -> Waits {
        Waits {
            per_client,
            global,
            open: AtomicUsize::new(0),
            by_client: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a wait for `client`, or says which limit refuses it.
    pub fn open(self: &Arc<Self>, client: Option<IpAddr>) -> Result<WaitGuard, WaitRefused> {
        let n = self.open.fetch_add(1, Ordering::AcqRel);
        if self.global > 0 && n >= self.global {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(WaitRefused::Server(self.global));
        }
        let client = client.map(client_key);
        if let Some(c) = client {
            let mut m = self.by_client.lock().expect("waits lock");
            let held = m.entry(c).or_insert(0);
            if self.per_client > 0 && *held >= self.per_client {
                drop(m);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(WaitRefused::Client(self.per_client));
            }
            *held += 1;
        }
        Ok(WaitGuard {
            waits: self.clone(),
            client,
            gauge: None,
        })
    }

    /// Waits open now.
    pub fn open_now(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let l = Limiter::new(60, 3).unwrap();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(a).is_ok());
        }
        let wait = l.check(a).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert!(l.check(b).is_ok(), "clients are counted apart");
        assert!(Limiter::new(0, 5).is_none());
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let l = Limiter::new(60, 2).unwrap();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.check(a).is_ok());
        assert!(l.check(b).is_ok());
        assert!(l.check(a).is_err(), "same /64");
        assert!(l.check(other).is_ok(), "another /64");
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_key(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_map_of_clients_stays_bounded() {
        let l = Limiter::with_capacity(60, 1, 1000).unwrap();
        for i in 0..100_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(i));
            let _ = l.check(ip);
            assert!(l.clients() <= 1000, "{}", l.clients());
        }
        // A client seen recently is still remembered (its bucket is empty).
        let last = IpAddr::from(std::net::Ipv4Addr::from(99_999u32));
        assert!(l.check(last).is_err());
    }

    #[test]
    fn waits_per_client_and_in_total() {
        let w = Arc::new(Waits::new(2, 3));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = w.open(Some(a)).unwrap();
        let _a2 = w.open(Some(a)).unwrap();
        assert_eq!(w.open(Some(a)).unwrap_err(), WaitRefused::Client(2));
        let _b1 = w.open(Some(b)).unwrap();
        assert_eq!(w.open(Some(b)).unwrap_err(), WaitRefused::Server(3));
        drop(a1);
        let _a3 = w.open(Some(a)).unwrap();
        assert_eq!(w.open_now(), 3);
    }
}
