//! Closing inherited file descriptors: the crate's only `unsafe` code.
//!
//! No safe API closes a descriptor one does not own, and that is exactly
//! the job: whatever the worker inherited beyond its socket (standard input
//! and output) and standard error must be gone before any data is opened,
//! so that a descriptor a library in the broker forgot to mark close-on-exec
//! cannot become a way out.
#![allow(unsafe_code)]

/// Closes every descriptor from 3 up.
///
/// Must run first thing in the worker, while it is single-threaded and
/// before it opens anything itself.
pub(crate) fn close_inherited() -> std::io::Result<()> {
    // SAFETY: `close_range` takes plain integers and touches no memory. The
    // worker calls this before it has opened any descriptor of its own, so
    // every descriptor from 3 up was inherited and no Rust value owns it:
    // closing them cannot invalidate an `OwnedFd` or a `File`.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
