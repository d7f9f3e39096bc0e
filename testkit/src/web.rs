//! [`WebGateway`]: the real gateway with an `http` listener `web` and a JSON access log, the
//! set-up the HTTP proxy tests (retries, HTTP/2 upstreams, gRPC) share; the test gives the
//! rest of the config (more listeners, routes, clusters).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Meshgate, access_log_records, free_port, http_get, metric_sum, wait_until};

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A running gateway: admin on a free port, `http` listener `web`, access log in JSON.
#[derive(Debug)]
pub struct WebGateway {
    pub mg: Meshgate,
    pub web: SocketAddr,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl WebGateway {
    /// `bin`: the `meshgate` binary; `cores`: `runtime.cores`; `body`: the config after the
    /// `web` listener (TOML tables).
    pub fn start(bin: &Path, cores: u32, body: &str) -> WebGateway {
        let admin = loopback(free_port());
        let web = loopback(free_port());
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("access.log");
        let config = format!(
            "version = 1\n[admin]\naddress = \"{admin}\"\n[runtime]\ncores = {cores}\n\
             drain_timeout = \"1s\"\n[access_log]\npath = \"{log}\"\nformat = \"json\"\n\
             [[listeners]]\nname = \"web\"\naddress = \"{web}\"\nprotocol = \"http\"\n{body}",
            log = log.display(),
        );
        let mg = Meshgate::start(bin, &config, admin).expect("gateway starts");
        WebGateway {
            mg,
            web,
            log,
            _dir: dir,
        }
    }

    /// `GET path` on the `web` listener (HTTP/1.1, one connection).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.web, path).unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
    }

    /// Access-log records of `path`, once `n` of them are written (or after 5 s).
    pub fn records(&self, path: &str, n: usize) -> Vec<serde_json::Value> {
        let read = || -> Vec<serde_json::Value> {
            let mut all = access_log_records(&self.log);
            all.retain(|r| r["path"] == path);
            all
        };
        wait_until(Duration::from_secs(5), || read().len() >= n);
        read()
    }

    /// The sum of a metric's samples with these labels.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.mg.metrics(), name, labels)
    }
}

/// A `[[routes]]` table on listener `web`: paths under `prefix` go to `cluster`. `extra`: more
/// lines of the table (`retry = { ... }`). Its name is `cluster` plus the prefix's letters.
pub fn prefix_route(prefix: &str, cluster: &str, extra: &str) -> String {
    let tag: String = prefix.chars().filter(char::is_ascii_alphanumeric).collect();
    format!(
        "\n[[routes]]\nname = \"{cluster}-{tag}\"\nlistener = \"web\"\n\
         match = {{ path = {{ prefix = \"{prefix}\" }} }}\ncluster = \"{cluster}\"\n{extra}\n"
    )
}

/// A `[[clusters]]` table: `name` over `endpoints`; `extra`: more lines (fields first, then
/// sub-tables such as `[clusters.tls]`).
pub fn cluster(name: &str, endpoints: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "\n[[clusters]]\nname = \"{name}\"\nendpoints = [{}]\n{extra}\n",
        list.join(", ")
    )
}
