//! Access logs: one record per TCP connection or HTTP request, written off the hot path.
//!
//! A shard fills a [`Record`] (cheap: counters, addresses, `Arc<str>` names) and hands it to a
//! bounded queue with `try_send`; a writer thread formats and writes. When the queue is full the
//! record is dropped and counted (`meshgate_access_log_records_total{outcome="dropped"}`): the
//! shard never blocks on the log. The writer sends records to the file in batches; a batch the
//! file refuses (disk full, I/O error) is counted as `failed` and discarded, so a full disk
//! costs the traffic nothing either. Keys follow Istio's default JSON access log, flags Envoy's vocabulary,
//! plus `downstream_peer_spiffe_id`, `tls_version` and `shard`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use serde::Serialize;

/// Where records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

/// Line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line, Istio's keys.
    Json,
    /// Envoy's default text format.
    Text,
}

/// One access-log record.
#[derive(Debug, Clone)]
pub struct Record {
    pub start_time: SystemTime,
    pub duration: Duration,
    /// `TCP`, `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'static str,
    pub method: Option<String>,
    pub path: Option<String>,
    pub authority: Option<String>,
    /// 0 for TCP.
    pub response_code: u16,
    /// Envoy response flags, `-` when none.
    pub response_flags: &'static str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub upstream_host: Option<SocketAddr>,
    /// HTTP: upstream attempts made (Envoy's `UPSTREAM_REQUEST_ATTEMPT_COUNT`); `None` when
    /// none was made, and for TCP.
    pub upstream_request_attempt_count: Option<u32>,
    pub upstream_cluster: Option<Arc<str>>,
    pub downstream_remote_address: SocketAddr,
    pub downstream_local_address: Option<SocketAddr>,
    pub requested_server_name: Option<String>,
    pub route_name: Option<Arc<str>>,
    pub listener: Arc<str>,
    pub downstream_peer_spiffe_id: Option<String>,
    pub tls_version: Option<&'static str>,
    pub x_forwarded_for: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    /// Why the gateway answered or closed itself, in Envoy's words (e.g.
    /// `rbac_access_denied_matched_policy[NAME]`); `None`: nothing to add.
    pub response_code_details: Option<String>,
    /// gRPC requests: the `grpc-status` the client was given.
    pub grpc_status: Option<u16>,
    pub shard: usize,
}

/// The shards' side: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: Sender<Msg>,
    dropped: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

#[derive(Debug)]
enum Msg {
    Record(Box<Record>),
    /// Write everything queued before this, flush, and stop (shutdown).
    Finish,
}

/// The writer thread's handle, kept by the control thread.
#[derive(Debug)]
pub struct Writer {
    reopen: Arc<AtomicBool>,
    tx: Sender<Msg>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AccessLog {
    /// Open the target and start the writer thread. `capacity` bounds the queue.
    pub fn start(
        target: Target,
        format: Format,
        capacity: usize,
    ) -> io::Result<(AccessLog, Writer)> {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        let out = open(&target)?;
        let reopen = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let counts = Counts {
            written: written.clone(),
            failed: failed.clone(),
        };
        let r = reopen.clone();
        let thread = std::thread::Builder::new()
            .name("meshgate-accesslog".into())
            .spawn(move || write_loop(rx, out, target, format, r, counts))?;
        Ok((
            AccessLog {
                tx: tx.clone(),
                dropped: Arc::new(AtomicU64::new(0)),
                written,
                failed,
            },
            Writer {
                reopen,
                tx: tx.clone(),
                thread: Some(thread),
            },
        ))
    }

    /// Queue a record; drop and count it if the writer is behind.
    pub fn log(&self, record: Record) {
        match self.tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Records written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Records lost because the file refused them (disk full, I/O error).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

impl Writer {
    /// Reopen the file at the next record (after logrotate moved it; SIGUSR1).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
    }

    /// Write what is queued, flush and stop the writer thread. Clones of the [`AccessLog`]
    /// may still exist (the admin API keeps one); records they send later are counted as
    /// dropped.
    pub fn finish(mut self) {
        // Queued behind every record already sent; blocks only while the writer drains.
        let _ = self.tx.send(Msg::Finish);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Out {
    Stdout(io::Stdout),
    File(File),
}

impl Out {
    fn w(&mut self) -> &mut dyn Write {
        match self {
            Out::Stdout(s) => s,
            Out::File(f) => f,
        }
    }
}

fn open(target: &Target) -> io::Result<Out> {
    Ok(match target {
        Target::Stdout => Out::Stdout(io::stdout()),
        Target::File(p) => Out::File(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("access log {}: {e}", p.display()))
                })?,
        ),
    })
}

/// The writer's outcome counters.
struct Counts {
    written: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

/// Formatted lines waiting to be written in one `write`.
struct Batch {
    bytes: Vec<u8>,
    records: u64,
    /// The last write failed (to log failures once, not per batch).
    failing: bool,
}

/// Write at most this much per batch.
const BATCH_BYTES: usize = 64 * 1024;

impl Batch {
    fn flush(&mut self, out: &mut Out, counts: &Counts) {
        if self.records == 0 {
            return;
        }
        let w = out.w();
        match w.write_all(&self.bytes).and_then(|()| w.flush()) {
            Ok(()) => {
                counts.written.fetch_add(self.records, Ordering::Relaxed);
                if self.failing {
                    tracing::warn!("the access log is writable again");
                    self.failing = false;
                }
            }
            Err(e) => {
                counts.failed.fetch_add(self.records, Ordering::Relaxed);
                if !self.failing {
                    tracing::error!(error = %e, "access log write failed; records are counted as failed (meshgate_access_log_records_total{{outcome=\"failed\"}}) until it works again");
                    self.failing = true;
                }
            }
        }
        self.bytes.clear();
        self.records = 0;
    }
}

fn write_loop(
    rx: Receiver<Msg>,
    mut out: Out,
    target: Target,
    format: Format,
    reopen: Arc<AtomicBool>,
    counts: Counts,
) {
    let mut batch = Batch {
        bytes: Vec::with_capacity(BATCH_BYTES + 1024),
        records: 0,
        failing: false,
    };
    loop {
        let msg = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                batch.flush(&mut out, &counts);
                return;
            }
        };
        if reopen.swap(false, Ordering::AcqRel) {
            batch.flush(&mut out, &counts);
            match open(&target) {
                Ok(o) => out = o,
                Err(e) => {
                    tracing::error!(error = %e, "cannot reopen the access log; keeping the old file")
                }
            }
        }
        let r = match msg {
            Some(Msg::Record(r)) => r,
            Some(Msg::Finish) => {
                batch.flush(&mut out, &counts);
                return;
            }
            None => {
                batch.flush(&mut out, &counts);
                continue;
            }
        };
        let mark = batch.bytes.len();
        let ok = match format {
            Format::Json => serde_json::to_writer(&mut batch.bytes, &JsonRecord::from(&*r)).is_ok(),
            Format::Text => {
                text(&mut batch.bytes, &r);
                true
            }
        };
        if !ok {
            batch.bytes.truncate(mark);
            continue;
        }
        batch.bytes.push(b'\n');
        batch.records += 1;
        if batch.bytes.len() >= BATCH_BYTES || rx.is_empty() {
            batch.flush(&mut out, &counts);
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    dt.format(&fmt).unwrap_or_else(|_| "-".to_string())
}

/// Istio's default JSON keys (plus meshgate's).
#[derive(Serialize)]
struct JsonRecord<'a> {
    start_time: String,
    method: Option<&'a str>,
    path: Option<&'a str>,
    protocol: &'a str,
    response_code: u16,
    response_flags: &'a str,
    bytes_received: u64,
    bytes_sent: u64,
    duration: u128,
    upstream_host: Option<String>,
    upstream_request_attempt_count: Option<u32>,
    upstream_cluster: Option<&'a str>,
    downstream_remote_address: String,
    downstream_local_address: Option<String>,
    requested_server_name: Option<&'a str>,
    route_name: Option<&'a str>,
    listener: &'a str,
    x_forwarded_for: Option<&'a str>,
    user_agent: Option<&'a str>,
    request_id: Option<&'a str>,
    response_code_details: Option<&'a str>,
    authority: Option<&'a str>,
    downstream_peer_spiffe_id: Option<&'a str>,
    tls_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_status: Option<u16>,
    shard: usize,
}

impl<'a> From<&'a Record> for JsonRecord<'a> {
    fn from(r: &'a Record) -> Self {
        JsonRecord {
            start_time: rfc3339(r.start_time),
            method: r.method.as_deref(),
            path: r.path.as_deref(),
            protocol: r.protocol,
            response_code: r.response_code,
            response_flags: r.response_flags,
            bytes_received: r.bytes_received,
            bytes_sent: r.bytes_sent,
            duration: r.duration.as_millis(),
            upstream_host: r.upstream_host.map(|a| a.to_string()),
            upstream_request_attempt_count: r.upstream_request_attempt_count,
            upstream_cluster: r.upstream_cluster.as_deref(),
            downstream_remote_address: r.downstream_remote_address.to_string(),
            downstream_local_address: r.downstream_local_address.map(|a| a.to_string()),
            requested_server_name: r.requested_server_name.as_deref(),
            route_name: r.route_name.as_deref(),
            listener: &r.listener,
            x_forwarded_for: r.x_forwarded_for.as_deref(),
            user_agent: r.user_agent.as_deref(),
            request_id: r.request_id.as_deref(),
            response_code_details: r.response_code_details.as_deref(),
            authority: r.authority.as_deref(),
            downstream_peer_spiffe_id: r.downstream_peer_spiffe_id.as_deref(),
            tls_version: r.tls_version,
            grpc_status: r.grpc_status,
            shard: r.shard,
        }
    }
}

/// Envoy's default format:
/// `[START] "METHOD PATH PROTOCOL" CODE FLAGS RX TX DURATION - "XFF" "UA" "REQID" "AUTHORITY" "UPSTREAM"`
fn text(out: &mut Vec<u8>, r: &Record) {
    let d = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let _ = write!(
        out,
        "[{}] \"{} {} {}\" {} {} {} {} {} - \"{}\" \"{}\" \"{}\" \"{}\" \"{}\"",
        rfc3339(r.start_time),
        d(&r.method),
        d(&r.path),
        r.protocol,
        r.response_code,
        r.response_flags,
        r.bytes_received,
        r.bytes_sent,
        r.duration.as_millis(),
        d(&r.x_forwarded_for),
        d(&r.user_agent),
        d(&r.request_id),
        d(&r.authority),
        r.upstream_host
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u64) -> Record {
        Record {
            start_time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            duration: Duration::from_millis(42),
            protocol: "TCP",
            method: None,
            path: None,
            authority: None,
            response_code: 0,
            response_flags: "-",
            bytes_received: i,
            bytes_sent: 2 * i,
            upstream_host: Some("127.0.0.1:8080".parse().expect("literal")),
            upstream_request_attempt_count: Some(2),
            upstream_cluster: Some("echo".into()),
            downstream_remote_address: "127.0.0.1:50000".parse().expect("literal"),
            downstream_local_address: None,
            requested_server_name: None,
            route_name: Some("default".into()),
            listener: "tcp-in".into(),
            downstream_peer_spiffe_id: None,
            tls_version: None,
            x_forwarded_for: None,
            user_agent: None,
            request_id: None,
            response_code_details: None,
            grpc_status: None,
            shard: 1,
        }
    }

    #[test]
    fn json_lines_with_istio_keys_and_reopen() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("access.log");
        let (log, writer) =
            AccessLog::start(Target::File(p.clone()), Format::Json, 16).expect("start");
        log.log(record(1));
        // logrotate: move the file away, ask for a reopen, log again.
        assert!(wait(|| log.written() == 1));
        std::fs::rename(&p, d.path().join("access.log.1")).expect("rotate");
        writer.reopen();
        log.log(record(2));
        drop(log);
        writer.finish();
        let old = std::fs::read_to_string(d.path().join("access.log.1")).expect("old");
        let new = std::fs::read_to_string(&p).expect("new");
        let v: serde_json::Value = serde_json::from_str(old.trim()).expect("json");
        assert_eq!(v["start_time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["protocol"], "TCP");
        assert_eq!(v["response_flags"], "-");
        assert_eq!(v["bytes_received"], 1);
        assert_eq!(v["upstream_host"], "127.0.0.1:8080");
        assert_eq!(v["upstream_request_attempt_count"], 2);
        assert_eq!(v["upstream_cluster"], "echo");
        assert_eq!(v["duration"], 42);
        assert_eq!(v["shard"], 1);
        let v: serde_json::Value = serde_json::from_str(new.trim()).expect("json");
        assert_eq!(v["bytes_received"], 2);
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a.log");
        // A writer that is stuck: capacity 1 and a flood of records; log() must never block.
        let (log, writer) = AccessLog::start(Target::File(p), Format::Text, 1).expect("start");
        let t = std::time::Instant::now();
        for i in 0..100_000 {
            log.log(record(i));
        }
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(log.dropped() > 0);
        assert!(wait(|| log.written() + log.dropped() == 100_000));
        drop(log);
        writer.finish();
    }

    #[test]
    fn a_full_disk_counts_failed_records_and_never_blocks() {
        let (log, writer) =
            AccessLog::start(Target::File("/dev/full".into()), Format::Json, 1024).expect("start");
        for i in 0..5_000 {
            log.log(record(i));
        }
        assert!(wait(|| log.failed() + log.dropped() == 5_000));
        assert_eq!(log.written(), 0);
        assert!(log.failed() > 0);
        drop(log);
        writer.finish();
    }

    fn wait(mut f: impl FnMut() -> bool) -> bool {
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}
