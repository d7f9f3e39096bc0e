//! A TLS load generator for tests: several threads each open connections in a loop at a set
//! rate, complete a real rustls handshake (with a client certificate when given), echo a
//! payload through the gateway and close; every failure is counted with its error. Plus the
//! blocking one-connection helpers the resumption and rotation tests use directly.
//!
//! The client configuration of each thread can be swapped while the load runs
//! ([`SharedConfig::set`]): that is how a test moves its clients to a new identity mid-run.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore, StreamOwned};

use crate::pki::Leaf;

/// A client TLS stream over a blocking socket.
pub type Client = StreamOwned<ClientConnection, TcpStream>;

/// Which TLS versions a client offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    /// TLS 1.3 and 1.2 (1.3 is chosen by a gateway that has it).
    Both,
    Tls12Only,
}

/// A ring-only rustls client config trusting `roots`, presenting `identity` if given.
/// `resumption`: e.g. `Resumption::disabled()` for full handshakes only, or
/// `Resumption::in_memory_sessions(64)` (each config then keeps its own session store).
pub fn client_config(
    roots: &[CertificateDer<'static>],
    identity: Option<&Leaf>,
    versions: Versions,
    resumption: Resumption,
) -> Result<Arc<ClientConfig>> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).context("add root")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider);
    let builder = match versions {
        Versions::Both => builder.with_safe_default_protocol_versions(),
        Versions::Tls12Only => builder.with_protocol_versions(&[&rustls::version::TLS12]),
    }
    .context("protocol versions")?
    .with_root_certificates(store);
    let mut config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(
                leaf.chain.clone(),
                PrivateKeyDer::Pkcs8(leaf.key_der.clone().into()),
            )
            .context("client certificate")?,
        None => builder.with_no_client_auth(),
    };
    config.resumption = resumption;
    Ok(Arc::new(config))
}

/// Connect, run the handshake to completion, return the stream.
pub fn connect(addr: SocketAddr, config: Arc<ClientConfig>, server_name: &str) -> Result<Client> {
    let name = ServerName::try_from(server_name.to_owned()).context("server name")?;
    let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connect {addr}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    sock.set_write_timeout(Some(Duration::from_secs(10)))?;
    sock.set_nodelay(true)?;
    let conn = ClientConnection::new(config, name).context("client connection")?;
    let mut tls = StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .context("TLS handshake")?;
    }
    Ok(tls)
}

/// Send `payload` and read the same bytes back (through an echo upstream).
pub fn echo(tls: &mut Client, payload: &[u8]) -> Result<()> {
    tls.write_all(payload).context("write")?;
    tls.flush().context("flush")?;
    let mut got = vec![0u8; payload.len()];
    tls.read_exact(&mut got).context("read the echo")?;
    if got != payload {
        bail!("echo differs: sent {payload:?}, got {got:?}");
    }
    Ok(())
}

/// Whether the stream's handshake resumed a session.
pub fn resumed(tls: &Client) -> bool {
    tls.conn.handshake_kind() == Some(HandshakeKind::Resumed)
}

/// Send close_notify and close.
pub fn close(mut tls: Client) {
    tls.conn.send_close_notify();
    let _ = tls.conn.complete_io(&mut tls.sock);
    let _ = tls.sock.shutdown(std::net::Shutdown::Both);
}

/// A client config that a running load picks up for its next connection.
#[derive(Debug, Clone)]
pub struct SharedConfig(Arc<RwLock<Arc<ClientConfig>>>);

impl SharedConfig {
    pub fn new(config: Arc<ClientConfig>) -> SharedConfig {
        SharedConfig(Arc::new(RwLock::new(config)))
    }

    pub fn set(&self, config: Arc<ClientConfig>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = config;
    }

    pub fn get(&self) -> Arc<ClientConfig> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What a load run did.
#[derive(Debug, Default)]
pub struct LoadCounts {
    /// Connections that handshook, echoed and closed cleanly.
    pub ok: AtomicU64,
    /// Of those, resumed handshakes.
    pub resumed: AtomicU64,
    /// Connections that failed anywhere (connect, handshake, echo).
    pub failed: AtomicU64,
    /// The first errors (at most 20), with the time into the run.
    pub errors: Mutex<Vec<String>>,
}

impl LoadCounts {
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    pub fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Threads opening connections in a loop until [`TlsLoad::stop`].
#[derive(Debug)]
pub struct TlsLoad {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub counts: Arc<LoadCounts>,
    pub started: Instant,
}

impl TlsLoad {
    /// One thread per entry of `configs`, each opening `rate` connections per second (as fast
    /// as it can if it falls behind) to `addr` with SNI `server_name`.
    pub fn start(
        addr: SocketAddr,
        server_name: &str,
        configs: Vec<SharedConfig>,
        rate: f64,
    ) -> TlsLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(LoadCounts::default());
        let started = Instant::now();
        let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let threads = configs
            .into_iter()
            .enumerate()
            .map(|(t, config)| {
                let stop = stop.clone();
                let counts = counts.clone();
                let name = server_name.to_owned();
                std::thread::spawn(move || {
                    let mut next = Instant::now();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                        next += period;
                        n += 1;
                        let payload = format!("t{t}-c{n}\n");
                        let result = connect(addr, config.get(), &name).and_then(|mut tls| {
                            echo(&mut tls, payload.as_bytes())?;
                            let r = resumed(&tls);
                            close(tls);
                            Ok(r)
                        });
                        match result {
                            Ok(r) => {
                                counts.ok.fetch_add(1, Ordering::Relaxed);
                                if r {
                                    counts.resumed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(e) => {
                                counts.failed.fetch_add(1, Ordering::Relaxed);
                                let mut errors =
                                    counts.errors.lock().unwrap_or_else(|p| p.into_inner());
                                if errors.len() < 20 {
                                    errors.push(format!(
                                        "{:?} thread {t} connection {n}: {e:#}",
                                        started.elapsed()
                                    ));
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        TlsLoad {
            stop,
            threads,
            counts,
            started,
        }
    }

    /// Stop every thread (each finishes its connection in flight) and return the counts and
    /// how long the load ran.
    pub fn stop(self) -> (Arc<LoadCounts>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        (self.counts, self.started.elapsed())
    }
}
