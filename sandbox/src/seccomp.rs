//! The worker's seccomp-BPF filter: an allow-list of the system calls a
//! confined executor needs, everything else refused with `EPERM`.
//!
//! What is deliberately absent: creating sockets (`socket`, `socketpair`),
//! `connect`, `bind`, `listen`, `accept`, `sendto`/`sendmsg` (the worker
//! only `read`s and `write`s the socket it inherited), `execve`/`execveat`,
//! `fork`/`vfork` and `clone` without `CLONE_THREAD` (new processes),
//! `ptrace`, `process_vm_*`, `mount` and the other mount-API calls,
//! `unshare`/`setns`, `io_uring_*`, `bpf`, `perf_event_open`, `keyctl`,
//! `setrlimit`/`prlimit64` with a new limit, `kill`/`tkill` (signals go
//! only to this process, through `tgkill`), `setuid` and friends, `chroot`,
//! `pivot_root`, `reboot`, module loading, `userfaultfd`, `memfd_create`.
//!
//! `clone3` is answered `ENOSYS`, not `EPERM`: its flags live in memory a
//! filter cannot read, and `ENOSYS` makes the C library fall back to
//! `clone`, whose flags the filter checks.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// System calls allowed without conditions.
const ALLOWED: &[libc::c_long] = &[
    // Memory.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    // Threads, synchronization, time.
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    // Descriptors. Opening is confined by Landlock to the data directory.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_openat,
    libc::SYS_getdents64,
    libc::SYS_fcntl,
    libc::SYS_readlinkat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getcwd,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_uname,
];

/// Allowed on x86_64 only (legacy calls the C library still uses there).
#[cfg(target_arch = "x86_64")]
const ALLOWED_ARCH: &[libc::c_long] = &[
    libc::SYS_arch_prctl,
    libc::SYS_poll,
    libc::SYS_epoll_wait,
    libc::SYS_open,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_readlink,
    libc::SYS_access,
];

#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_ARCH: &[libc::c_long] = &[];

fn arch() -> Result<TargetArch, String> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())
}

fn cond(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, Len::Qword, op, value).map_err(|e| e.to_string())
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conditions).map_err(|e| e.to_string())
}

/// The allow-list filter and the `clone3 → ENOSYS` filter.
pub(crate) fn filters() -> Result<[BpfProgram; 2], String> {
    let pid = u64::from(std::process::id());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .chain(ALLOWED_ARCH)
        .map(|&n| (n, vec![]))
        .collect();
    // Threads only: `clone` must carry CLONE_THREAD.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(0, Op::MaskedEq(thread), thread)?])?],
    );
    // Let the C library fall back from clone3 to clone (see above).
    rules.insert(libc::SYS_clone3, vec![]);
    // Signals to this process only (abort, thread wake-ups).
    rules.insert(libc::SYS_tgkill, vec![rule(vec![cond(0, Op::Eq, pid)?])?]);
    // Reading limits, never setting them.
    rules.insert(
        libc::SYS_prlimit64,
        vec![rule(vec![cond(0, Op::Eq, 0)?, cond(2, Op::Eq, 0)?])?],
    );
    // Thread names and reading the dumpable flag, nothing else of prctl.
    rules.insert(
        libc::SYS_prctl,
        [libc::PR_SET_NAME, libc::PR_GET_NAME, libc::PR_GET_DUMPABLE]
            .iter()
            .map(|&op| rule(vec![cond(0, Op::Eq, op as u64)?]))
            .collect::<Result<_, _>>()?,
    );
    let allow = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch()?,
    )
    .map_err(|e| e.to_string())?;
    let no_clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )
    .map_err(|e| e.to_string())?;
    Ok([
        allow
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())?,
        no_clone3
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())?,
    ])
}

/// Installs both filters on every thread of the process.
///
/// The `clone3` filter goes first: installing a filter calls `prctl` and
/// `seccomp`, which the allow-list refuses once it is in place. The order
/// does not change the verdicts: the kernel runs every filter and the most
/// restrictive answer wins (`ENOSYS` over allow for `clone3`).
pub(crate) fn install() -> Result<usize, String> {
    let [allow, no_clone3] = filters()?;
    seccompiler::apply_filter_all_threads(&no_clone3).map_err(|e| e.to_string())?;
    seccompiler::apply_filter_all_threads(&allow).map_err(|e| e.to_string())?;
    Ok(ALLOWED.len() + ALLOWED_ARCH.len() + 4)
}
