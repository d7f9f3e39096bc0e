//! A minimal blocking HTTP/1.1 client for the admin API (loopback TCP or Unix socket).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};

const TIMEOUT: Duration = Duration::from_secs(5);

/// `127.0.0.1:15000`, `unix:/run/meshgate/admin.sock` or an absolute socket path.
#[derive(Debug, Clone)]
pub enum AdminAddr {
    Tcp(String),
    Unix(String),
}

impl AdminAddr {
    pub fn parse(s: &str) -> AdminAddr {
        if let Some(p) = s.strip_prefix("unix:") {
            AdminAddr::Unix(p.to_string())
        } else if s.starts_with('/') {
            AdminAddr::Unix(s.to_string())
        } else {
            AdminAddr::Tcp(
                s.trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_string(),
            )
        }
    }
}

impl std::fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAddr::Tcp(a) => write!(f, "{a}"),
            AdminAddr::Unix(p) => write!(f, "unix:{p}"),
        }
    }
}

/// Error meaning "nobody answered" (exit 69) as opposed to a bad answer.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot reach the admin API at {addr}: {source}; is `meshgate run` running? (--admin / MESHGATE_ADMIN select another address)"
)]
pub struct Unreachable {
    pub addr: String,
    pub source: std::io::Error,
}

/// GET `path`; returns (status, body).
pub fn get(addr: &AdminAddr, path: &str) -> Result<(u16, String)> {
    request(addr, "GET", path, TIMEOUT)
}

/// GET `path` for a command's output: the body of a 200, or the exit code after the error has
/// been reported (69 when nobody answers, 1 for any other failure).
pub fn fetch(addr: &AdminAddr, path: &str) -> std::result::Result<String, u8> {
    match get(addr, path) {
        Ok((200, body)) => Ok(body),
        Ok((code, body)) => {
            eprintln!(
                "error: admin API answered {code} to GET {path}: {}",
                body.trim()
            );
            Err(super::exit::FAILURE)
        }
        Err(e) => {
            super::report(&e);
            Err(if e.downcast_ref::<Unreachable>().is_some() {
                super::exit::UNAVAILABLE
            } else {
                super::exit::FAILURE
            })
        }
    }
}

/// POST `path` with an empty body; returns (status, body).
pub fn post(addr: &AdminAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    request(addr, "POST", path, timeout)
}

fn request(addr: &AdminAddr, method: &str, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: meshgate-admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    let raw = match addr {
        AdminAddr::Tcp(a) => {
            let mut s = connect_tcp(a).map_err(|source| Unreachable {
                addr: addr.to_string(),
                source,
            })?;
            s.set_read_timeout(Some(timeout))?;
            exchange(&mut s, &req)?
        }
        AdminAddr::Unix(p) => {
            let mut s = UnixStream::connect(p).map_err(|source| Unreachable {
                addr: addr.to_string(),
                source,
            })?;
            s.set_read_timeout(Some(timeout))?;
            exchange(&mut s, &req)?
        }
    };
    parse_response(&raw).with_context(|| format!("bad response from admin API at {addr}"))
}

fn connect_tcp(a: &str) -> std::io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        "address resolves to nothing",
    );
    for sa in a.to_socket_addrs()? {
        match TcpStream::connect_timeout(&sa, TIMEOUT) {
            Ok(s) => {
                s.set_read_timeout(Some(TIMEOUT))?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn exchange(s: &mut (impl Read + Write), req: &str) -> Result<Vec<u8>> {
    s.write_all(req.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

fn parse_response(raw: &[u8]) -> Result<(u16, String)> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let body_at = match resp.parse(raw)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => bail!("truncated response"),
    };
    let code = resp.code.unwrap_or(0);
    Ok((code, String::from_utf8_lossy(&raw[body_at..]).into_owned()))
}
