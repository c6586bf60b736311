//! An in-process TCP proxy to put between an agent and its coordinator, to break the network
//! on purpose: delay every chunk, blackhole (hold every byte, in one direction or both, as a
//! partitioned or half-open link does: nothing arrives, nothing fails), reset every open
//! connection, or accept new connections and close them at once. It counts the connections
//! it accepted, with when, so a test can see how clients reconnect.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Forward every chunk after this delay.
    Delay(Duration),
    /// Hold everything in both directions (existing and new connections): a partition.
    Blackhole,
    /// Hold only what the upstream sends back (coordinator to agent); the other way passes.
    BlackholeDown,
    /// Accept new connections and close them at once; existing ones are left alone.
    AcceptThenClose,
}

#[derive(Debug)]
struct Shared {
    upstream: Mutex<SocketAddr>,
    accepted: Mutex<Vec<Instant>>,
    /// Cancelled by [`Proxy::reset`]; replaced by a fresh one after.
    resets: Mutex<CancellationToken>,
}

/// A running proxy; stops (and drops every connection) when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (mode, _) = watch::channel(Mode::Pass);
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            accepted: Mutex::new(Vec::new()),
            resets: Mutex::new(CancellationToken::new()),
        });
        let stop = CancellationToken::new();
        let (modes, sh, st) = (mode.clone(), shared.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    () = st.cancelled() => return,
                    a = listener.accept() => match a {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                sh.accepted.lock().expect("proxy lock").push(Instant::now());
                if *modes.borrow() == Mode::AcceptThenClose {
                    drop(client);
                    continue;
                }
                let upstream = *sh.upstream.lock().expect("proxy lock");
                let reset = sh.resets.lock().expect("proxy lock").clone();
                let (rx, stop) = (modes.subscribe(), st.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = pump(cr, sw, rx.clone(), false);
                    let down = pump(sr, cw, rx, true);
                    tokio::select! {
                        // A reset wins over anything the pumps could still forward (held
                        // bytes are dropped with the connection, never delivered late).
                        biased;
                        () = stop.cancelled() => {}
                        () = reset.cancelled() => {}
                        _ = async { tokio::join!(up, down) } => {}
                    }
                    // Dropping both halves closes the connection.
                });
            }
        });
        Proxy {
            addr,
            mode,
            shared,
            stop,
        }
    }

    /// The proxy's own address, e.g. `127.0.0.1:40123`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for `--coordinator`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Forward new connections to `upstream` from now on.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.shared.upstream.lock().expect("proxy lock") = upstream;
    }

    /// Closes every open connection at once.
    pub fn reset(&self) {
        let mut r = self.shared.resets.lock().expect("proxy lock");
        r.cancel();
        *r = CancellationToken::new();
    }

    /// When each connection was accepted, oldest first.
    pub fn accepted(&self) -> Vec<Instant> {
        self.shared.accepted.lock().expect("proxy lock").clone()
    }
}

/// Copies `from` to `to`, honouring the mode for each chunk; `down`: the upstream-to-client
/// direction. Held bytes stay unread (TCP backs up), as on a link that drops packets.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    down: bool,
) {
    let held = |m: Mode| m == Mode::Blackhole || (down && m == Mode::BlackholeDown);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Wait while this direction is held.
        while held(*mode.borrow()) {
            if mode.changed().await.is_err() {
                return;
            }
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // A change of mode re-checks before reading more.
            r = mode.changed() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
        };
        // What was read before a blackhole started is held too.
        while held(*mode.borrow()) {
            if mode.changed().await.is_err() {
                return;
            }
        }
        let now = *mode.borrow();
        if let Mode::Delay(d) = now {
            tokio::time::sleep(d).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
