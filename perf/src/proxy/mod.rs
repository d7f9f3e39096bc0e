//! The proxies under comparison. Each writes its own config for a [`ProxySpec`] and says how to
//! run itself in the foreground with one worker; [`Running`] starts it pinned to the proxy core,
//! waits until it is ready, reads its CPU time and stops it.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::{Context, Result, bail};

use crate::certs::Certs;

use crate::scenarios::Listener;
use crate::sys;

mod floor;
mod haproxy;
mod meshgate;
mod nginx;

pub use floor::NAME as FLOOR;
pub use meshgate::{Meshgate, NOT_SUPPORTED};

/// The Debian packages the harness can use (nginx's stream module is its own package on
/// Debian 12; linux-perf is only for syscall counts).
pub const APT_LINE: &str = "apt-get install -y nginx libnginx-mod-stream haproxy wrk nghttp2-client openssl linux-perf fonts-dejavu-core";

/// What one proxy run must do.
#[derive(Debug, Clone)]
pub struct ProxySpec {
    pub listener: Listener,
    /// Where the proxy listens (loopback, ephemeral).
    pub listen: SocketAddr,
    /// The origin it forwards to.
    pub upstream: SocketAddr,
    /// Admin/status port for proxies that have one.
    pub admin: SocketAddr,
    /// Directory for this run's config, pid and log files.
    pub dir: PathBuf,
    /// File-name stem for this run, e.g. `tcp-rr-haproxy-r1`.
    pub stem: String,
    /// The run's certificates (TLS scenarios).
    pub certs: Arc<Certs>,
}

pub trait Proxy: Sync {
    fn name(&self) -> &'static str;
    /// Ok if it can run here; otherwise what is missing and how to install it.
    fn check(&self) -> Result<(), String>;
    /// Version string for the report.
    fn version(&self) -> String;
    fn supports(&self, listener: Listener) -> bool;
    /// Writes the config for `spec` and returns the foreground command that runs it.
    fn prepare(&self, spec: &ProxySpec) -> Result<Command>;
    /// Extra readiness check once the listener accepts (e.g. an admin `/ready`).
    fn is_ready(&self, _spec: &ProxySpec) -> bool {
        true
    }
}

/// Looks a program up in PATH and the sbin directories (nginx and haproxy live in /usr/sbin).
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"])
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file())
}

/// First line of a command's combined output (for versions).
pub fn first_line(cmd: &mut Command) -> String {
    match cmd.output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        }
        Err(e) => format!("unknown ({e})"),
    }
}

/// A started proxy process.
#[derive(Debug)]
pub struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    /// Spawns `cmd` pinned to `cpu`, output to `log`; it dies with the harness.
    pub fn spawn(mut cmd: Command, cpu: usize, log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let set = sys::cpu_set(cpu);
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: the closure runs between fork and exec and only makes two async-signal-safe
        // syscalls on data prepared before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Err with the exit status and the log's tail if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("exited ({st}): {}", self.log_tail());
        }
        Ok(())
    }

    /// Waits until `listen` accepts connections and the proxy's own check passes.
    pub fn wait_ready(
        &mut self,
        proxy: &dyn Proxy,
        spec: &ProxySpec,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if TcpStream::connect_timeout(&spec.listen, Duration::from_millis(200)).is_ok()
                && proxy.is_ready(spec)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "not ready after {}s (listener {} not accepting): {}",
                    timeout.as_secs(),
                    spec.listen,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        sys::process_tree(self.pid())
    }

    pub fn threads(&self) -> usize {
        sys::tree_threads(self.pid())
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!("did not exit within 5 s of SIGTERM; killed")
    }

    fn log_tail(&self) -> String {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        if tail.is_empty() {
            format!("(no output; log {})", self.log.display())
        } else {
            tail
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET path` over plain HTTP/1.1; Some(status) if a response came back.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let line = std::str::from_utf8(&head[..n]).ok()?;
    line.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// The proxies in report column order; meshgate's binary path comes from the command line.
/// `uring-floor`, a reference rather than a proxy, gets a column only when `--proxies` names it.
pub fn all(meshgate: &Path, selected: &[String]) -> Vec<Box<dyn Proxy>> {
    let mut v: Vec<Box<dyn Proxy>> = vec![
        Box::new(Meshgate::new(meshgate.to_path_buf())),
        Box::new(haproxy::Haproxy),
        Box::new(nginx::Nginx),
    ];
    if selected.iter().any(|s| s == FLOOR) {
        v.push(Box::new(floor::Floor));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawned_process_is_pinned_and_stops() -> Result<()> {
        let dir = std::env::temp_dir();
        let log = dir.join(format!("meshgate-perf-test-{}.log", std::process::id()));
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut r = Running::spawn(cmd, 0, &log)?;
        r.check_alive()?;
        assert!(sys::threads_not_pinned(r.pid(), 0).is_empty());
        assert_eq!(r.threads(), 1);
        r.stop()?;
        let _ = fs::remove_file(log);
        Ok(())
    }
}
