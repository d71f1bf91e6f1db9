//! The crate's only `unsafe` code: closing inherited descriptors, forking
//! the fork server and moving its code onto huge pages.
//!
//! No safe API closes a descriptor one does not own, and that is exactly
//! the job of [`close_inherited`]: whatever the worker inherited beyond its
//! socket (standard input and output) and standard error must be gone
//! before any data is opened, so that a descriptor a library in the broker
//! (or the fork server) holds cannot become a way out. And no safe API
//! forks: [`fork`] checks the one condition that makes it sound. Nor does
//! any safe API replace a mapping: [`code_on_huge_pages`] does, with an
//! identical copy of the bytes it replaces.
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
    single_threaded("forks")?;
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

/// Refuses unless the calling process has exactly one thread; `what` names
/// the operation for the error.
fn single_threaded(what: &str) -> std::io::Result<()> {
    let threads = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse::<u32>().ok());
    if threads == Some(1) {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "the fork server has {threads:?} threads; it {what} only with one"
        )))
    }
}

/// The size of a transparent huge page with 4 KiB base pages (x86-64,
/// aarch64).
const HUGE: usize = 2 << 20;

/// Moves the executable's code and read-only data onto anonymous
/// transparent huge pages, and returns how many bytes of it the kernel
/// holds on huge pages.
///
/// A forked child gets copies of its parent's page-table entries for
/// anonymous memory, but none for file mappings: every worker used to
/// fault in the code it runs page by page, tens of thousands of faults per
/// query, and tear them down again at exit. On huge pages the same code is
/// a few dozen entries, copied at the fork. Only the 2 MiB-aligned interior
/// of each read-only mapping of the executable moves; the edges stay
/// file-backed. The cost is a one-time copy (about 140 MiB for a release
/// build) that stays resident in the fork server and is shared by its
/// workers.
///
/// A copy the kernel did not put on huge pages is dropped and the mapping
/// left as it was: on small anonymous pages a fork would copy tens of
/// thousands of entries, slower than faulting the code in. So nothing
/// moves where transparent huge pages are off for this process. An error
/// (the first mapping's reason) means that nothing moved.
pub(crate) fn code_on_huge_pages() -> std::io::Result<u64> {
    single_threaded("moves its code")?;
    let offered = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")?;
    if offered.contains("[never]") {
        return Err(std::io::Error::other(
            "transparent huge pages are off (/sys/kernel/mm/transparent_hugepage/enabled)",
        ));
    }
    if rustix::thread::transparent_huge_pages_are_disabled()? {
        return Err(std::io::Error::other(
            "transparent huge pages are off for this process (PR_SET_THP_DISABLE)",
        ));
    }
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let parse = |hex| usize::from_str_radix(hex, 16).map_err(std::io::Error::other);
    let (mut moved, mut first_error) = (0u64, None);
    for line in maps.lines() {
        // start-end perms offset device inode path: no field before the
        // path holds a `/`, and the path may hold spaces.
        let (Some(at), mut fields) = (line.find('/'), line.split_ascii_whitespace()) else {
            continue;
        };
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let protection = match perms {
            "r-xp" => libc::PROT_READ | libc::PROT_EXEC,
            "r--p" => libc::PROT_READ,
            _ => continue,
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let from = parse(start)?.next_multiple_of(HUGE);
        let to = parse(end)? / HUGE * HUGE;
        if to <= from || std::path::Path::new(&line[at..]) != exe {
            continue;
        }
        match replace_with_copy(from, to - from, protection) {
            Ok(bytes) => moved += bytes,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) if moved == 0 => Err(e),
        _ => Ok(moved),
    }
}

/// The kernel's count of this process's anonymous memory on huge pages.
fn anon_huge_bytes() -> std::io::Result<u64> {
    std::fs::read_to_string("/proc/self/smaps_rollup")?
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| std::io::Error::other("no AnonHugePages in /proc/self/smaps_rollup"))
}

/// Replaces the `len` bytes mapped at `at` (both multiples of [`HUGE`])
/// with an identical copy on anonymous huge pages, mapped with
/// `protection`, and returns how many bytes the kernel holds on huge pages.
/// A copy mostly on small pages is dropped instead (an error).
fn replace_with_copy(at: usize, len: usize, protection: libc::c_int) -> std::io::Result<u64> {
    let error = std::io::Error::last_os_error;
    // SAFETY: the new mapping belongs to this function until `mremap` puts
    // it in the place of the old one, with the same bytes at the same
    // addresses and the same protection, so that any code running there
    // (this function's caller included) finds the same instructions before
    // and after, and any reference into the read-only data the same values.
    // The copy is writable only at its own address, before it is in place.
    // `mremap` replaces the old mapping under the address-space lock; the
    // kernel unmaps the destination before it moves the source, so a
    // failure after that (an allocation failure in the kernel) leaves a hole
    // where this code was and the server dies on return: it fails closed,
    // and the broker starts another. No Rust value refers to the memory
    // mapped, copied or unmapped here otherwise.
    unsafe {
        let space = libc::mmap(
            std::ptr::null_mut(),
            len + HUGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if space == libc::MAP_FAILED {
            return Err(error());
        }
        // Keep the aligned `len` bytes of the `len + HUGE` mapped.
        let copy = (space as usize).next_multiple_of(HUGE);
        let head = copy - space as usize;
        if head > 0 {
            libc::munmap(space, head);
        }
        libc::munmap((copy + len) as *mut libc::c_void, HUGE - head);
        let copy = copy as *mut libc::c_void;
        let mut huge = 0;
        let outcome = if libc::madvise(copy, len, libc::MADV_HUGEPAGE) != 0 {
            Err(error())
        } else {
            // Only the copy allocates between the two counts (this
            // process has one thread).
            let copied = anon_huge_bytes().and_then(|before| {
                std::ptr::copy_nonoverlapping(at as *const u8, copy.cast::<u8>(), len);
                Ok(anon_huge_bytes()?.saturating_sub(before))
            });
            match copied {
                Err(e) => Err(e),
                Ok(bytes) if bytes < len as u64 / 2 => Err(std::io::Error::other(format!(
                    "the kernel gave small pages for {} of {} MiB",
                    (len as u64 - bytes) >> 20,
                    len >> 20
                ))),
                Ok(bytes) => {
                    huge = bytes;
                    if libc::mprotect(copy, len, protection) != 0 {
                        Err(error())
                    } else {
                        Ok(())
                    }
                }
            }
        };
        if outcome.is_ok()
            && libc::mremap(
                copy,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                at as *mut libc::c_void,
            ) != libc::MAP_FAILED
        {
            return Ok(huge);
        }
        let why = outcome.err().unwrap_or_else(error);
        libc::munmap(copy, len);
        Err(why)
    }
}
