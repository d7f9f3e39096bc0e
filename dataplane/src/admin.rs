//! The admin API: `/ready`, `/live`, `/metrics`, `/config_dump`, `/status`, `/clusters` (every
//! endpoint with its weight, health and ejection state).
//!
//! Runs on its own plain OS threads (one per admin socket: loopback TCP and/or a Unix socket),
//! never on a shard: a slow scrape can not stall traffic, and traffic can not stall a scrape.
//! Requests are tiny and served one at a time, with a read deadline and a size cap.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::gateway::{ReloadOutcome, Shared};
use crate::metrics::{BuildInfo, Stats};

const MAX_REQUEST: usize = 8 * 1024;
const READ_DEADLINE: Duration = Duration::from_secs(5);

/// What the admin API reports. Built once by `meshgate run`.
#[derive(Debug)]
pub struct AdminState {
    pub stats: Arc<Stats>,
    pub shared: Arc<Shared>,
    pub build: BuildInfo,
    pub shards: usize,
    /// Where `POST /reload` and `POST /config/rollback` go; None = unavailable.
    pub reload: Option<crossbeam_channel::Sender<ReloadRequest>>,
    /// Applied configs kept in the state directory; None = history disabled.
    pub history: Option<meshgate_control::history::History>,
    /// More metric families appended to `/metrics` (the federation poller's); None = none.
    pub extra_metrics: Option<ExtraMetrics>,
}

/// A source of OpenMetrics text families rendered after the dataplane's (before `# EOF`).
#[derive(Clone)]
pub struct ExtraMetrics(pub Arc<dyn Fn() -> String + Send + Sync>);

impl std::fmt::Debug for ExtraMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtraMetrics")
    }
}

fn render_metrics(state: &AdminState) -> String {
    let mut body = state.stats.render(&state.build);
    if let Some(extra) = &state.extra_metrics {
        let more = (extra.0)();
        match body.rfind("# EOF") {
            Some(i) => body.insert_str(i, &more),
            None => body.push_str(&more),
        }
    }
    body
}

/// Reply to a reload request.
pub type ReloadReply = Result<ReloadOutcome, ReloadFailure>;

/// A reload asked for through the admin API; the control thread answers on `reply`.
#[derive(Debug)]
pub struct ReloadRequest {
    pub action: ControlAction,
    pub reply: mpsc::Sender<ReloadReply>,
}

/// What the control thread is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlAction {
    /// Re-read the config file.
    Reload,
    /// Put history entry `to` (default: the one before the newest) back in the config file and
    /// apply it.
    Rollback { to: Option<u64> },
    /// Stop accepting on every listener; open connections continue (`POST /drain`).
    Drain,
}

/// Why a reload was refused. The running generation stays in force.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadFailure {
    pub reason: String,
    /// Config errors, each with its field path and hint (empty for other failures).
    pub errors: Vec<ConfigErrorView>,
}

/// A config error as the admin API reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigErrorView {
    pub path: String,
    pub message: String,
    pub hint: Option<String>,
    pub line: Option<usize>,
}

impl ReloadFailure {
    pub fn invalid(e: &meshgate_config::LoadError) -> Self {
        ReloadFailure {
            reason: format!("{} is invalid; the running config stays in force", e.origin),
            errors: e
                .errors
                .iter()
                .map(|c| ConfigErrorView {
                    path: c.path.clone(),
                    message: c.message.clone(),
                    hint: c.hint.clone(),
                    line: c.line,
                })
                .collect(),
        }
    }
    pub fn other(reason: impl Into<String>) -> Self {
        ReloadFailure {
            reason: reason.into(),
            errors: Vec::new(),
        }
    }
}

/// How long `POST /reload` waits for the control thread.
const RELOAD_WAIT: Duration = Duration::from_secs(30);

/// The admin listeners, bound and serving.
#[derive(Debug)]
pub struct AdminServer {
    pub tcp: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
}

/// Bind the admin sockets and serve them on background threads.
pub fn serve(
    state: Arc<AdminState>,
    tcp: Option<SocketAddr>,
    unix: Option<&Path>,
) -> io::Result<AdminServer> {
    let mut server = AdminServer {
        tcp: None,
        unix: None,
    };
    if let Some(addr) = tcp {
        let l = TcpListener::bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("admin address {addr}: {e}")))?;
        server.tcp = Some(l.local_addr()?);
        spawn_loop(
            "meshgate-admin",
            state.clone(),
            move || l.accept().map(|(c, _)| c),
            |c: &std::net::TcpStream| {
                let _ = c.set_read_timeout(Some(READ_DEADLINE));
                let _ = c.set_write_timeout(Some(READ_DEADLINE));
            },
        )?;
    }
    if let Some(path) = unix {
        // A socket file left by a previous run (crash, SIGKILL) would make bind fail.
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let l = UnixListener::bind(path).map_err(|e| {
            io::Error::new(e.kind(), format!("admin socket {}: {e}", path.display()))
        })?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        }
        server.unix = Some(path.to_path_buf());
        spawn_loop(
            "meshgate-admin-unix",
            state,
            move || l.accept().map(|(c, _)| c),
            |c: &std::os::unix::net::UnixStream| {
                let _ = c.set_read_timeout(Some(READ_DEADLINE));
                let _ = c.set_write_timeout(Some(READ_DEADLINE));
            },
        )?;
    }
    Ok(server)
}

/// Serve one admin socket on its own thread, one request at a time.
fn spawn_loop<C, A>(
    name: &str,
    state: Arc<AdminState>,
    mut accept: A,
    prepare: fn(&C),
) -> io::Result<()>
where
    C: Read + Write + 'static,
    A: FnMut() -> io::Result<C> + Send + 'static,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            loop {
                match accept() {
                    Ok(c) => {
                        prepare(&c);
                        handle(&state, c);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })?;
    Ok(())
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
    fn json(value: &impl Serialize) -> Self {
        match serde_json::to_string_pretty(value) {
            Ok(mut body) => {
                body.push('\n');
                Response {
                    status: 200,
                    content_type: "application/json",
                    body,
                }
            }
            Err(e) => Response::text(500, format!("cannot encode JSON: {e}\n")),
        }
    }
}

fn handle(state: &AdminState, mut conn: impl Read + Write) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let (method, path) = loop {
        let n = match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                break (
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                );
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => continue,
            Ok(httparse::Status::Partial) => {
                write_response(&mut conn, &Response::text(431, "request too large\n"));
                return;
            }
            Err(_) => {
                write_response(&mut conn, &Response::text(400, "bad request\n"));
                return;
            }
        }
    };
    let resp = route(state, &method, &path);
    write_response(&mut conn, &resp);
}

fn query_u64(query: &str, key: &str) -> Result<Option<u64>, ()> {
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
            return v.parse().map(Some).map_err(|_| ());
        }
    }
    Ok(None)
}

fn route(state: &AdminState, method: &str, target: &str) -> Response {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match (method, path) {
        ("GET" | "HEAD", "/live") => Response::text(200, "live\n"),
        ("GET" | "HEAD", "/ready") => {
            if state.shared.is_ready() {
                Response::text(200, "ready\n")
            } else if state.shared.draining.load(Ordering::Acquire) {
                Response::text(503, "draining\n")
            } else {
                Response::text(503, "starting\n")
            }
        }
        ("GET" | "HEAD", "/metrics") => Response {
            status: 200,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: render_metrics(state),
        },
        ("GET" | "HEAD", "/config_dump") => Response::json(&*state.shared.current().config),
        ("GET" | "HEAD", "/status") => Response::json(&status(state)),
        ("GET" | "HEAD", "/certs") => Response::json(&state.stats.certs()),
        ("GET" | "HEAD", "/clusters") => Response::json(&state.stats.health.current_status()),
        ("POST", "/reload") => control(state, ControlAction::Reload),
        ("POST", "/drain") => match control(state, ControlAction::Drain) {
            r if r.status == 200 => Response::json(&drain_status(state)),
            r => r,
        },
        ("GET" | "HEAD", "/drain") => Response::json(&drain_status(state)),
        ("POST", "/config/rollback") => match query_u64(query, "to") {
            Ok(to) => control(state, ControlAction::Rollback { to }),
            Err(()) => {
                Response::text(400, "`to` must be a history id, e.g. /config/rollback?to=3\n")
            }
        },
        ("GET" | "HEAD", "/config/history") => match &state.history {
            None => {
                Response::text(404, "config history is disabled (no writable state directory)\n")
            }
            Some(h) => match h.list() {
                Ok(entries) => Response::json(&entries),
                Err(e) => Response::text(500, format!("{e}\n")),
            },
        },
        ("GET" | "HEAD", p) if p.starts_with("/config/history/") => {
            let id = p.trim_start_matches("/config/history/").parse::<u64>();
            match (&state.history, id) {
                (None, _) => Response::text(404, "config history is disabled\n"),
                (_, Err(_)) => Response::text(400, "use /config/history/<id>\n"),
                (Some(h), Ok(id)) => match h.get(id) {
                    Ok((_, text)) => Response {
                        status: 200,
                        content_type: "application/toml",
                        body: text,
                    },
                    Err(e) => Response::text(404, format!("{e}\n")),
                },
            }
        }
        (_, "/reload" | "/config/rollback" | "/drain") => Response::text(405, "use POST\n"),
        (_, "/live" | "/ready" | "/metrics" | "/config_dump" | "/status") => {
            Response::text(405, format!("{method} not allowed on {path}; use GET\n"))
        }
        _ => Response::text(
            404,
            "not found; endpoints: /ready /live /metrics /config_dump /status /certs /clusters /config/history[/ID], POST /reload, POST /config/rollback[?to=ID], POST /drain\n"
                .to_string(),
        ),
    }
}

fn write_response(conn: &mut impl Write, r: &Response) {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        r.status,
        reason,
        r.content_type,
        r.body.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(r.body.as_bytes());
    let _ = conn.flush();
}

fn control(state: &AdminState, action: ControlAction) -> Response {
    let Some(tx) = &state.reload else {
        return Response::text(503, "reload is not available\n");
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    if tx
        .send(ReloadRequest {
            action,
            reply: reply_tx,
        })
        .is_err()
    {
        return Response::text(
            503,
            "the control thread is not accepting reloads (shutting down?)\n",
        );
    }
    match reply_rx.recv_timeout(RELOAD_WAIT) {
        Ok(Ok(outcome)) => Response::json(&outcome),
        Ok(Err(failure)) => {
            let mut r = Response::json(&failure);
            r.status = 400;
            r
        }
        Err(_) => Response::text(
            504,
            "reload did not finish in time; see the gateway's log\n",
        ),
    }
}

/// What `POST /drain` and `GET /drain` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct DrainStatus {
    pub draining: bool,
    /// Downstream connections still open, over all listeners and shards.
    pub open_connections: i64,
}

fn drain_status(state: &AdminState) -> DrainStatus {
    let snap = state.shared.current();
    DrainStatus {
        draining: state.shared.draining.load(Ordering::Acquire),
        open_connections: snap
            .config
            .listeners
            .iter()
            .map(|l| state.stats.listener_active(&l.name))
            .sum(),
    }
}

/// The `/status` document; `meshgate status` renders it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub ready: bool,
    pub draining: bool,
    pub shards: usize,
    pub ring_mode: String,
    pub config_source: String,
    pub config_generation: u64,
    pub listeners: Vec<ListenerStatus>,
    pub clusters: Vec<ClusterStatus>,
    /// One entry per shard.
    #[serde(default)]
    pub shard_stats: Vec<ShardStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ShardStatus {
    pub shard: usize,
    /// Downstream connections open on this shard.
    pub connections: i64,
    /// Time spent working / parked waiting for work since the shard started.
    pub busy_seconds: f64,
    pub idle_seconds: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub address: SocketAddr,
    pub protocol: String,
    pub max_connections: u32,
    pub active: i64,
    pub accepted: u64,
    pub limit_rejected: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// TLS handshakes since start (listeners that terminate TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsStatus>,
}

/// TLS handshakes of one listener since start, summed over shards.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct TlsStatus {
    pub full: u64,
    pub resumed: u64,
    pub failed: u64,
    /// Completed handshakes by version.
    pub tls13: u64,
    pub tls12: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub name: String,
    pub endpoints: Vec<SocketAddr>,
    pub active: i64,
    pub connects: u64,
    pub connect_failures: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

fn status(state: &AdminState) -> Status {
    let s = &state.stats;
    let snap = state.shared.current();
    let config = &snap.config;
    Status {
        version: state.build.version.to_string(),
        pid: std::process::id(),
        uptime_seconds: s.started.elapsed().as_secs(),
        ready: state.shared.is_ready(),
        draining: state.shared.draining.load(Ordering::Acquire),
        shards: state.shards,
        ring_mode: state.build.ring_mode.clone(),
        config_source: snap.source.clone(),
        config_generation: snap.id,
        listeners: config
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| ListenerStatus {
                name: l.name.clone(),
                address: snap.listener_addrs.get(i).copied().unwrap_or(l.address),
                protocol: l.protocol.to_string(),
                max_connections: l.max_connections,
                active: s.listener_active(&l.name),
                accepted: s.listener_total(&l.name, |x| x.accepted.get()),
                limit_rejected: s.listener_total(&l.name, |x| x.limit_rejected.get()),
                bytes_in: s.listener_total(&l.name, |x| x.bytes_in.get()),
                bytes_out: s.listener_total(&l.name, |x| x.bytes_out.get()),
                tls: l.tls.as_ref().map(|_| TlsStatus {
                    full: s.listener_total(&l.name, |x| x.tls.completed_total(false)),
                    resumed: s.listener_total(&l.name, |x| x.tls.completed_total(true)),
                    failed: s.listener_total(&l.name, |x| x.tls.failed_total()),
                    tls13: s.listener_total(&l.name, |x| x.tls.version_total("TLSv1.3")),
                    tls12: s.listener_total(&l.name, |x| x.tls.version_total("TLSv1.2")),
                }),
            })
            .collect(),
        clusters: config
            .clusters
            .iter()
            .map(|c| ClusterStatus {
                name: c.name.clone(),
                endpoints: c.endpoints.clone(),
                active: s.cluster_active(&c.name),
                connects: s.cluster_total(&c.name, |x| x.connects.get()),
                connect_failures: s.cluster_total(&c.name, |x| x.connect_failures.get()),
                bytes_sent: s.cluster_total(&c.name, |x| x.bytes_sent.get()),
                bytes_received: s.cluster_total(&c.name, |x| x.bytes_received.get()),
            })
            .collect(),
        shard_stats: s
            .shard_summary()
            .into_iter()
            .enumerate()
            .map(|(shard, (connections, util))| {
                let (busy, idle) = util.unwrap_or_default();
                ShardStatus {
                    shard,
                    connections,
                    busy_seconds: busy.as_secs_f64(),
                    idle_seconds: idle.as_secs_f64(),
                }
            })
            .collect(),
    }
}
