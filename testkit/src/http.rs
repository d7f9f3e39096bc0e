//! HTTP test peers shared by the integration tests: nginx as an origin (two servers,
//! `stable` and `canary`, echoing what the gateway sent), curl with `-i` parsed into a
//! [`Resp`], the echo line's fields, and [`TlsOrigin`] (nginx serving HTTPS with client
//! authentication).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Fnv, fill_pseudo_random, free_port, wait_until};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `name` on the PATH (or in /usr/sbin, where Debian puts nginx).
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// nginx, or a note that the test is skipped.
pub fn nginx_or_skip(test: &str) -> Option<PathBuf> {
    let found = tool("nginx");
    if found.is_none() {
        eprintln!(
            "SKIPPED {test}: nginx is not installed (apt-get install nginx; .ci/run installs it)"
        );
    }
    found
}

pub const BIG: usize = 8 * 1024 * 1024;

/// The start of a test nginx's config in `d`: one foreground worker, its pid, error log and
/// temp paths under `d`, up to the open `http {` block.
fn conf_head(d: &Path, connections: u32) -> String {
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections {connections}; }}
http {{
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;"#,
        d = d.display()
    )
}

/// Write `conf` to `d/nginx.conf` and start nginx on it, quiet.
fn spawn_nginx(nginx: &Path, d: &Path, conf: &str) -> Child {
    std::fs::write(d.join("nginx.conf"), conf).expect("write nginx.conf");
    Command::new(nginx)
        .arg("-p")
        .arg(d)
        .arg("-c")
        .arg(d.join("nginx.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nginx")
}

/// `curl -sS -w %{http_version} ARGS`: (exit code, HTTP version, body).
pub fn curl_version(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_version}"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, version) = text.rsplit_once('\n').unwrap_or((&text, ""));
    (
        out.status.code().unwrap_or(-1),
        version.to_owned(),
        body.to_owned(),
    )
}

/// nginx as the origin: two servers, `stable` and `canary`, each answering `/` with a line
/// that echoes what the gateway sent, serving an 8 MiB file, a chunked copy of it, PUT
/// uploads and a 204.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    pub dir: tempfile::TempDir,
    pub stable: SocketAddr,
    pub canary: SocketAddr,
    pub big_sum: u64,
}

impl Nginx {
    pub fn start(nginx: &Path) -> Nginx {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for sub in ["files", "put", "tmp"] {
            std::fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        let mut big = vec![0u8; BIG];
        fill_pseudo_random(&mut 7u64, &mut big);
        let mut sum = Fnv::default();
        sum.update(&big);
        std::fs::write(d.join("files/big.bin"), &big).expect("write big.bin");
        let (stable, canary) = (addr(free_port()), addr(free_port()));
        let locations = format!(
            r#"
    location / {{
      add_header x-origin $origin;
      add_header x-secret s3cr3t;
      return 200 "origin=$origin method=$request_method uri=$request_uri host=$http_host xff=$http_x_forwarded_for xfp=$http_x_forwarded_proto rid=$http_x_request_id conn=$connection env=$http_x_env team=$http_x_team debug=$http_x_debug xfcc=$http_x_forwarded_client_cert\n";
    }}
    location /files/ {{ root {d}; }}
    location /chunked/ {{
      alias {d}/files/;
      sub_filter_types *;
      sub_filter 'no-such-text-in-the-file' 'x';
    }}
    location /put/ {{
      root {d};
      dav_methods PUT;
      create_full_put_path on;
      client_max_body_size 64m;
      client_body_buffer_size 1m;
    }}
    location = /nocontent {{ return 204; }}
"#,
            d = d.display()
        );
        let conf = format!(
            r#"{head}
  log_format mg '$server_port $connection "$request" $status';
  access_log {d}/access.log mg;
  keepalive_requests 100000;
  keepalive_timeout 75s;
  server {{
    listen {stable};
    set $origin stable;
    {locations}
  }}
  server {{
    listen {canary};
    set $origin canary;
    {locations}
  }}
}}
"#,
            head = conf_head(d, 4096),
            d = d.display()
        );
        let child = spawn_nginx(nginx, d, &conf);
        let mut n = Nginx {
            child,
            dir,
            stable,
            canary,
            big_sum: sum.0,
        };
        let up = wait_until(Duration::from_secs(10), || {
            TcpStream::connect(n.stable).is_ok() && TcpStream::connect(n.canary).is_ok()
        });
        if !up {
            let _ = n.child.kill();
            panic!(
                "nginx did not start:\n{}",
                std::fs::read_to_string(n.dir.path().join("error.log")).unwrap_or_default()
            );
        }
        n
    }

    /// nginx's access log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response as curl showed it with `-i`.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// `curl -sS -i ARGS`; the last response (curl prints one per URL and interim ones).
pub fn curl(args: &[&str]) -> Resp {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "20"])
        .args(args)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_last(&String::from_utf8_lossy(&out.stdout))
}

pub fn parse_last(text: &str) -> Resp {
    // The last status line (HTTP/1.x or HTTP/2), at the start of a line.
    let start = text
        .match_indices("HTTP/")
        .map(|(i, _)| i)
        .filter(|&i| i == 0 || text.as_bytes()[i - 1] == b'\n')
        .last()
        .unwrap_or(0);
    let (head, body) = text[start..].split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Resp {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// The keys of the origin's echo line, in order.
pub const KEYS: [&str; 12] = [
    "origin", "method", "uri", "host", "xff", "xfp", "rid", "conn", "env", "team", "debug", "xfcc",
];

/// The value of `key=` in an origin echo line (values may contain spaces: each runs to the
/// next key).
pub fn field<'a>(body: &'a str, key: &str) -> &'a str {
    let Some(at) = body.find(&format!("{key}=")) else {
        return "";
    };
    let rest = &body[at + key.len() + 1..];
    let next = KEYS
        .iter()
        .position(|k| *k == key)
        .and_then(|i| KEYS.get(i + 1));
    let end = next
        .and_then(|n| rest.find(&format!(" {n}=")))
        .unwrap_or_else(|| rest.find('\n').unwrap_or(rest.len()));
    &rest[..end]
}

/// nginx serving HTTPS at a fresh port with `cert`/`key`, requiring a client certificate
/// from `client_ca`, answering with what it verified.
#[derive(Debug)]
pub struct TlsOrigin {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl TlsOrigin {
    pub fn start(nginx: &Path, cert: &Path, key: &Path, client_ca: &Path) -> TlsOrigin {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("tmp")).expect("mkdir");
        let addr = addr(free_port());
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  server {{
    listen {addr} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_client_certificate {ca};
    ssl_verify_client on;
    location / {{
      return 200 "tls-origin verify=$ssl_client_verify sni=$ssl_server_name conn=$connection uri=$request_uri\n";
    }}
  }}
}}
"#,
            d = d.display(),
            cert = cert.display(),
            key = key.display(),
            ca = client_ca.display(),
        );
        std::fs::write(d.join("nginx.conf"), conf).expect("write conf");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let mut o = TlsOrigin {
            child,
            addr,
            _dir: dir,
        };
        if !wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(o.addr).is_ok()
        }) {
            let _ = o.child.kill();
            panic!("TLS nginx did not start");
        }
        o
    }
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raw bytes to `gw` on a new connection; everything it answers until it closes (or 5 s
/// pass), and whether it closed. For requests curl is too polite to send.
pub fn raw(gw: SocketAddr, request: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(gw).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(request).expect("send");
    let mut out = Vec::new();
    let mut chunk = [0u8; 65536];
    let closed = loop {
        match s.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// nginx as an HTTP/2 origin: `listen ADDR http2` (nginx 1.22: prior-knowledge h2c on a plain
/// listener) or, with `tls = Some((cert, key))`, `listen ADDR ssl http2` (ALPN h2). It answers
/// `proto=$server_protocol conn=$connection uri=$request_uri` and logs
/// `$server_protocol $connection $connection_requests "$request" $status` per request.
/// `keepalive_requests`: requests per connection before nginx sends GOAWAY.
/// `PUT /upload/NAME` stores the whole request body as `dir/upload/NAME` before nginx answers 201
/// (`return 200` answers before the body arrives, and curl 7.88 over HTTP/2 then often reports
/// "Empty reply from server" even against nginx directly).
#[derive(Debug)]
pub struct NginxH2 {
    child: Child,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
}

impl NginxH2 {
    pub fn start(nginx: &Path, tls: Option<(&Path, &Path)>, keepalive_requests: u32) -> NginxH2 {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("tmp")).expect("mkdir");
        std::fs::create_dir_all(d.join("upload")).expect("mkdir");
        let addr = addr(free_port());
        let listen = match tls {
            None => format!("listen {addr} http2;"),
            Some((cert, key)) => format!(
                "listen {addr} ssl http2;\n    ssl_certificate {};\n    ssl_certificate_key {};",
                cert.display(),
                key.display()
            ),
        };
        let conf = format!(
            r#"{head}
  log_format h2 '$server_protocol $connection $connection_requests "$request" $status';
  access_log {d}/access.log h2;
  keepalive_requests {keepalive_requests};
  server {{
    {listen}
    location / {{
      return 200 "proto=$server_protocol conn=$connection uri=$request_uri\n";
    }}
    location /upload/ {{
      root {d};
      dav_methods PUT;
      client_max_body_size 16m;
    }}
  }}
}}
"#,
            head = conf_head(d, 1024),
            d = d.display(),
        );
        let child = spawn_nginx(nginx, d, &conf);
        let mut n = NginxH2 { child, dir, addr };
        if !wait_until(Duration::from_secs(10), || {
            TcpStream::connect(n.addr).is_ok()
        }) {
            let _ = n.child.kill();
            panic!(
                "nginx (http2) did not start:\n{}",
                std::fs::read_to_string(n.dir.path().join("error.log")).unwrap_or_default()
            );
        }
        n
    }

    /// The access log's lines so far (complete lines only).
    pub fn log_lines(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        complete.lines().map(str::to_owned).collect()
    }
}

impl Drop for NginxH2 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
