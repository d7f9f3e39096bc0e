//! Host probing: sysctl, memlock limit, ring setup flags with fallbacks, CPU affinity.

use std::io;
use std::sync::OnceLock;
use std::time::Duration;

use io_uring::{IoUring, cqueue, opcode, types};

use super::{RingFeatures, RtError};

/// Locked memory we need: rings, the provided-buffer ring and registered structures.
pub const MEMLOCK_NEED: u64 = 512 * 1024;

/// Value of `kernel.io_uring_disabled` (0 when the sysctl does not exist: older kernels).
pub(crate) fn io_uring_disabled() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

pub(crate) fn memlock_check() -> Result<(), RtError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the rlimit struct we pass, which lives on our stack.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc != 0 {
        return Err(RtError::Io(io::Error::last_os_error()));
    }
    if lim.rlim_cur != libc::RLIM_INFINITY && lim.rlim_cur < MEMLOCK_NEED {
        return Err(RtError::MemlockTooLow {
            have_kib: lim.rlim_cur / 1024,
            need_kib: MEMLOCK_NEED / 1024,
        });
    }
    Ok(())
}

/// Build a ring, trying the best setup flags first. Only `EINVAL` (flag unknown to this kernel)
/// moves on to the next, smaller set; any other error is final.
pub(crate) fn build_ring(entries: u32) -> Result<(IoUring, RingFeatures), RtError> {
    let entries = entries.clamp(8, 32768);
    // (single_issuer + defer_taskrun, coop_taskrun + taskrun_flag)
    let attempts = [(true, true), (false, true), (false, false)];
    let mut last = None;
    for (defer, coop) in attempts {
        let mut b = IoUring::builder();
        b.setup_clamp().setup_cqsize(entries.saturating_mul(4));
        if coop {
            b.setup_submit_all()
                .setup_coop_taskrun()
                .setup_taskrun_flag();
        }
        if defer {
            b.setup_single_issuer().setup_defer_taskrun();
        }
        match b.build(entries) {
            Ok(ring)
                if !ring.params().is_feature_ext_arg() || !ring.params().is_feature_nodrop() =>
            {
                return Err(RtError::Unavailable {
                    source: io::Error::new(
                        io::ErrorKind::Unsupported,
                        "this kernel's io_uring lacks IORING_FEAT_EXT_ARG/NODROP (Linux 5.11 or newer is needed)",
                    ),
                });
            }
            Ok(ring) => {
                let features = RingFeatures {
                    coop_taskrun: coop,
                    taskrun_flag: coop,
                    single_issuer: defer,
                    defer_taskrun: defer,
                    provided_buffer_rings: false,
                    multishot_accept: false,
                };
                return Ok((ring, features));
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(setup_error(e)),
        }
    }
    Err(setup_error(last.unwrap_or_else(|| {
        io::Error::from_raw_os_error(libc::EINVAL)
    })))
}

fn setup_error(e: io::Error) -> RtError {
    let disabled = io_uring_disabled();
    if e.raw_os_error() == Some(libc::EPERM) && disabled != 0 {
        RtError::Disabled { value: disabled }
    } else {
        RtError::Unavailable { source: e }
    }
}

/// Whether `IORING_ACCEPT_MULTISHOT` works here, probed once per process on a throw-away ring:
/// arm a multishot accept on a fresh listener and cancel it; a kernel without it says `EINVAL`.
pub(crate) fn multishot_accept_supported() -> bool {
    static CACHE: OnceLock<bool> = OnceLock::new();
    *CACHE.get_or_init(|| probe_multishot_accept().unwrap_or(false))
}

fn probe_multishot_accept() -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut ring = IoUring::new(8)?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .build()
        .user_data(1);
    let cancel = opcode::AsyncCancel::new(1).build().user_data(2);
    // SAFETY: neither entry carries a pointer; the listener outlives the ring (dropped after the
    // wait below, and the ring is dropped at the end of this function before it).
    unsafe {
        let mut sq = ring.submission();
        sq.push(&accept)
            .map_err(|_| io::Error::other("probe ring full"))?;
        sq.push(&cancel)
            .map_err(|_| io::Error::other("probe ring full"))?;
    }
    let ts = types::Timespec::from(Duration::from_secs(1));
    let args = types::SubmitArgs::new().timespec(&ts);
    let mut seen = 0;
    let mut supported = false;
    for _ in 0..4 {
        match ring.submitter().submit_with_args(2, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        for cqe in ring.completion() {
            seen += 1;
            if cqe.user_data() == 1 {
                supported = cqe.result() != -libc::EINVAL;
                if cqe.result() >= 0 {
                    // A stray connection: close it (cannot really happen on a fresh port).
                    // SAFETY: the kernel handed us this fd and nothing else owns it.
                    unsafe { libc::close(cqe.result()) };
                }
                if cqueue::more(cqe.flags()) {
                    seen -= 1;
                }
            }
        }
        if seen >= 2 {
            break;
        }
    }
    drop(ring);
    drop(listener);
    Ok(supported)
}

/// Probe the host. See [`super::check`].
pub(crate) fn check() -> Result<RingFeatures, RtError> {
    let disabled = io_uring_disabled();
    if disabled >= 2 {
        return Err(RtError::Disabled { value: disabled });
    }
    memlock_check()?;
    let (mut ring, mut features) = build_ring(64)?;
    enter_probe(&mut ring)?;
    features.provided_buffer_rings = super::bufring::probe(&ring);
    features.multishot_accept = multishot_accept_supported();
    drop(ring);
    Ok(features)
}

/// One NOP through the ring: a seccomp profile may allow `io_uring_setup` but not
/// `io_uring_enter`, and then no shard could ever run.
fn enter_probe(ring: &mut IoUring) -> Result<(), RtError> {
    let nop = opcode::Nop::new().build().user_data(7);
    // SAFETY: a NOP carries no pointers.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| RtError::Io(io::Error::other("probe ring full")))?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(RtError::EnterFailed { source: e }),
        }
    }
    ring.completion().for_each(drop);
    Ok(())
}

/// CPUs this process may run on (from `sched_getaffinity` of the process, so `taskset` works).
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data for which all-zero is the valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: getpid has no preconditions; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into `set`, which we own.
    let rc = unsafe {
        libc::sched_getaffinity(
            libc::getpid(),
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        )
    };
    if rc != 0 {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..n).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` < CPU_SETSIZE, the number of CPUs a cpu_set_t holds.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Pin the calling thread to `cpu`.
pub(crate) fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cpu {cpu} is beyond CPU_SETSIZE"),
        ));
    }
    // SAFETY: all-zero is the valid empty cpu_set_t.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu < CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 = the calling thread; the set is a valid cpu_set_t of the size we pass.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "cannot pin shard thread to cpu {cpu}: {e} (allowed cpus: {:?})",
                allowed_cpus()
            ),
        ));
    }
    Ok(())
}
