//! The crate's only `unsafe` code: closing inherited descriptors and
//! forking the fork server.
//!
//! No safe API closes a descriptor one does not own, and that is exactly
//! the job of [`close_inherited`]: whatever the worker inherited beyond its
//! socket (standard input and output) and standard error must be gone
//! before any data is opened, so that a descriptor a library in the broker
//! (or the fork server) holds cannot become a way out. And no safe API
//! forks: [`fork`] checks the one condition that makes it sound.
#![allow(unsafe_code)]

/// Closes every descriptor from 3 up.
///
/// Must run first thing in the worker, while it is single-threaded. The
/// Rust values that own the closed descriptors (in a forked worker, the
/// fork server's) must never be dropped afterwards: the worker ends with
/// [`std::process::exit`], which runs no destructors.
pub(crate) fn close_inherited() -> std::io::Result<()> {
    // SAFETY: `close_range` takes plain integers and touches no memory. In
    // a freshly executed worker every descriptor from 3 up was inherited
    // and no Rust value owns it; in a forked worker the values that own
    // them belong to the fork server's stack frames, which the worker never
    // returns to (see above): no `OwnedFd` or `File` is used after this.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Which side of a [`fork`] this is.
pub(crate) enum Forked {
    /// The original process; the child's id.
    Parent(rustix::process::Pid),
    /// The new process.
    Child,
}

/// Forks the calling process, which must have exactly one thread: that is
/// checked first, and a process with more is refused.
pub(crate) fn fork() -> std::io::Result<Forked> {
    let threads = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse::<u32>().ok());
    if threads != Some(1) {
        return Err(std::io::Error::other(format!(
            "the fork server has {threads:?} threads; it forks only with one"
        )));
    }
    // SAFETY: with a single thread there is no lock another thread could
    // hold across the fork and no state another thread could be changing:
    // the child is an exact copy of a quiescent process, and glibc's own
    // fork handlers make its allocator usable in the child.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => rustix::process::Pid::from_raw(pid)
            .map(Forked::Parent)
            .ok_or_else(|| std::io::Error::other("fork returned an invalid process id")),
    }
}
