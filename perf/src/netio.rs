//! A minimal epoll wrapper for the origin and the load generators: one thread, many
//! non-blocking sockets, no runtime, so the side that is not being measured stays cheap.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub const IN: u32 = libc::EPOLLIN as u32;
pub const OUT: u32 = libc::EPOLLOUT as u32;
pub const ET: u32 = libc::EPOLLET as u32;
pub const RDHUP: u32 = libc::EPOLLRDHUP as u32;
pub const ERR: u32 = (libc::EPOLLERR | libc::EPOLLHUP) as u32;

#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

/// One readiness event: the token given at registration and the event bits.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub token: u64,
    pub events: u32,
}

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 has no preconditions; a non-negative result is a new fd we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly created descriptor owned by nobody else.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn ctl(&self, op: i32, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: ev outlives the call; the kernel validates fd.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn add(&self, fd: &impl AsRawFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd.as_raw_fd(), token, events)
    }

    pub fn modify(&self, fd: &impl AsRawFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd.as_raw_fd(), token, events)
    }

    pub fn delete(&self, fd: &impl AsRawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd.as_raw_fd(), 0, 0)
    }

    /// Waits up to `timeout_ms` and fills `out` with ready events (cleared first).
    pub fn wait(
        &self,
        buf: &mut [libc::epoll_event],
        out: &mut Vec<Event>,
        timeout_ms: i32,
    ) -> io::Result<()> {
        out.clear();
        // SAFETY: buf is a valid writable array of buf.len() events.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        for ev in &buf[..n as usize] {
            // Copy out of the (packed on x86_64) struct; no references into it.
            let (token, events) = (ev.u64, ev.events);
            out.push(Event { token, events });
        }
        Ok(())
    }
}

/// A zeroed event buffer for [`Epoll::wait`].
pub fn event_buf(n: usize) -> Vec<libc::epoll_event> {
    vec![libc::epoll_event { events: 0, u64: 0 }; n]
}
