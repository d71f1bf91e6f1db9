//! Confinement of a worker process, applied before it opens any data, and
//! the self-test that measures what was achieved.
//!
//! The steps, in order (each is recorded in the [`Report`]):
//!
//! 1. a clean environment (the broker spawns workers with none; checked);
//! 2. inherited descriptors beyond standard input, output and error closed;
//! 3. `PR_SET_PDEATHSIG` = SIGKILL, then a check that the fork server is
//!    still the parent (it may have died before the signal was armed); the
//!    server itself dies with the broker;
//! 4. `PR_SET_NO_NEW_PRIVS`;
//! 5. `PR_SET_DUMPABLE` = 0 (no core dumps, no ptrace attach, `/proc/<pid>`
//!    owned by root);
//! 6. rlimits: `RLIMIT_CORE` 0, `RLIMIT_AS` (the memory budget),
//!    `RLIMIT_CPU` (a backstop to the broker's deadline), `RLIMIT_NOFILE`,
//!    `RLIMIT_FSIZE` 0 (spilling is disabled, so no file is ever written);
//! 7. Landlock: read-only access to the data directory; every other file
//!    access, TCP bind and connect, abstract Unix sockets and signals to
//!    other processes are refused (as far as the kernel's ABI covers them);
//! 8. seccomp-BPF on all threads ([`crate::seccomp`]): an allow-list with no
//!    socket creation, exec, new processes, ptrace, mount, namespaces,
//!    io_uring or bpf.
//!
//! Then the self-test tries to list `/`, to open a UDP socket and to run
//! `/bin/sh`, and the [`Level`] follows from what was refused.

use std::path::Path;
use std::str::FromStr;

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};
use rustix::process::{Resource, Rlimit};
use serde::{Deserialize, Serialize};

/// How confined a worker is, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Process limits only: the kernel enforces no file-system confinement.
    None,
    /// Landlock confines file access to the data directory; no seccomp.
    Landlock,
    /// Landlock and the seccomp allow-list, both verified by the self-test.
    Strict,
}

impl Level {
    /// The name used on the command line and in audit entries.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::None => "none",
            Level::Landlock => "landlock",
            Level::Strict => "strict",
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Level::None),
            "landlock" => Ok(Level::Landlock),
            "strict" => Ok(Level::Strict),
            other => Err(format!(
                "unknown sandbox level `{other}`; use strict, landlock or none"
            )),
        }
    }
}

/// The whole environment of a worker, set by the broker (nothing is
/// inherited): allocator settings for a short-lived process. A fresh
/// process pays a page fault for every page it touches; transparent huge
/// pages (where the kernel offers them on request), a few allocation
/// arenas, and freed memory kept for reuse instead of being returned and
/// faulted in again took about 2 ms off a small query's latency in the
/// sandbox (`cargo bench --bench engine -- sandbox_latency`).
pub const WORKER_ENV: &[(&str, &str)] = &[(
    "GLIBC_TUNABLES",
    "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=4:glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824",
)];

/// Resource limits of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Address-space limit (`RLIMIT_AS`) in bytes; DataFusion's memory pool
    /// gets most of it, the rest is the program itself.
    pub memory_bytes: u64,
    /// CPU-time limit (`RLIMIT_CPU`) in seconds: a backstop to the broker's
    /// wall-clock deadline.
    pub cpu_seconds: u64,
    /// Open-descriptor limit (`RLIMIT_NOFILE`).
    pub max_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 4 << 30,
            cpu_seconds: 120,
            max_files: 64,
        }
    }
}

/// One confinement step or self-test check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// What was done or tried.
    pub name: String,
    /// Whether it had the wanted effect (for self-tests: was refused).
    pub ok: bool,
    /// How, or why not.
    pub detail: String,
}

/// What a worker achieved, sent to the broker before any data is opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The achieved level.
    pub level: Level,
    /// The Landlock ABI the kernel offers (0: none).
    pub landlock_abi: i32,
    /// Every step and self-test check, in order.
    pub checks: Vec<Check>,
    /// How many bytes of the executable's code and read-only data the fork
    /// server holds on huge pages, which a fork copies as a few page-table
    /// entries (or why none): a matter of speed, not of confinement.
    pub code_on_huge_pages: Result<u64, String>,
}

impl Report {
    /// A human explanation: the level, then each check.
    pub fn explain(&self) -> String {
        let mut out = format!(
            "sandbox level: {} (Landlock ABI {})\n",
            self.level,
            if self.landlock_abi > 0 {
                self.landlock_abi.to_string()
            } else {
                "unavailable".to_owned()
            }
        );
        for c in &self.checks {
            out.push_str(&format!(
                "  {} {}: {}\n",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            ));
        }
        out.push_str(&match &self.code_on_huge_pages {
            Ok(0) => "  code on huge pages: none (no read-only mapping of the executable spans an aligned 2 MiB)\n".to_owned(),
            Ok(bytes) => format!("  code on huge pages: {} MiB\n", bytes >> 20),
            Err(why) => format!("  code on huge pages: none ({why})\n"),
        });
        out
    }
}

/// Check names that decide the level.
mod name {
    pub const ENV: &str = "clean environment";
    pub const FDS: &str = "inherited descriptors closed";
    pub const PDEATHSIG: &str = "killed when the broker dies (PR_SET_PDEATHSIG)";
    pub const NO_NEW_PRIVS: &str = "no new privileges (PR_SET_NO_NEW_PRIVS)";
    pub const DUMPABLE: &str = "not dumpable (PR_SET_DUMPABLE=0)";
    pub const RLIMITS: &str = "rlimits (CORE, AS, CPU, NOFILE, FSIZE)";
    pub const LANDLOCK: &str = "Landlock: read-only data directory";
    pub const SECCOMP: &str = "seccomp-BPF allow-list on all threads";
    pub const READ_OUTSIDE: &str = "self-test: list / (outside the data directory)";
    pub const SOCKET: &str = "self-test: open a UDP socket";
    pub const EXEC: &str = "self-test: run /bin/sh";
    /// The process-level steps every level needs.
    pub const BASE: &[&str] = &[ENV, FDS, PDEATHSIG, NO_NEW_PRIVS, DUMPABLE, RLIMITS];
}

fn step(checks: &mut Vec<Check>, name: &str, result: Result<String, String>) {
    let (ok, detail) = match result {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    checks.push(Check {
        name: name.to_owned(),
        ok,
        detail,
    });
}

fn io(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The fork server's own confinement, before it warms up: no inherited
/// descriptors, killed with the broker (`broker` is its process id), no new
/// privileges, not dumpable, no core files. The server reads no data; each
/// worker it forks then confines itself fully ([`confine`]).
pub(crate) fn prelude(broker: u32) -> Result<(), String> {
    crate::sys::close_inherited().map_err(io)?;
    die_with(broker)?;
    rustix::thread::set_no_new_privs(true).map_err(io)?;
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(io)?;
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    rustix::process::setrlimit(Resource::Core, none).map_err(io)
}

/// Arms SIGKILL at the parent's death, then checks that the parent is
/// still `parent` (it may have died before the signal was armed).
fn die_with(parent: u32) -> Result<String, String> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(io)?;
    let now = rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32);
    if now == Some(parent) {
        Ok("SIGKILL".to_owned())
    } else {
        Err("the parent is gone".to_owned())
    }
}

/// Confines the calling process (which must still be single-threaded) and
/// runs the self-test. `parent` is the fork server's process id;
/// `code_on_huge_pages` what it achieved, for the report.
pub fn confine(
    data_dir: &Path,
    limits: &Limits,
    parent: u32,
    code_on_huge_pages: Result<u64, String>,
) -> Report {
    let mut checks = Vec::new();
    step(&mut checks, name::ENV, {
        let foreign = std::env::vars_os()
            .filter(|(k, v)| !WORKER_ENV.iter().any(|(wk, wv)| k == wk && v == wv))
            .count();
        if foreign == 0 {
            Ok("only the allocator settings the broker sets".to_owned())
        } else {
            Err(format!("{foreign} other variables"))
        }
    });
    step(
        &mut checks,
        name::FDS,
        crate::sys::close_inherited()
            .map(|()| "descriptors from 3 up closed".to_owned())
            .map_err(io),
    );
    step(&mut checks, name::PDEATHSIG, die_with(parent));
    step(
        &mut checks,
        name::NO_NEW_PRIVS,
        rustix::thread::set_no_new_privs(true)
            .map(|()| "set".to_owned())
            .map_err(io),
    );
    step(
        &mut checks,
        name::DUMPABLE,
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
            .map(|()| "set".to_owned())
            .map_err(io),
    );
    step(&mut checks, name::RLIMITS, set_rlimits(limits));
    let (abi, landlock) = landlock(data_dir);
    step(&mut checks, name::LANDLOCK, landlock);
    step(
        &mut checks,
        name::SECCOMP,
        crate::seccomp::install().map(|n| format!("{n} system calls allowed, the rest EPERM")),
    );
    self_test(&mut checks);
    let level = level_of(&checks);
    Report {
        level,
        landlock_abi: abi,
        checks,
        code_on_huge_pages,
    }
}

/// The level that a list of steps and self-test checks earns: `strict` when
/// every step held and the self-test's file, socket and exec attempts were
/// all refused; `landlock` when everything but seccomp held; `none`
/// otherwise. A step that reports success is not enough: its self-test
/// must also have been refused.
fn level_of(checks: &[Check]) -> Level {
    let ok = |name: &str| checks.iter().any(|c| c.name == name && c.ok);
    let base = name::BASE.iter().all(|n| ok(n));
    let landlock = base && ok(name::LANDLOCK) && ok(name::READ_OUTSIDE);
    let seccomp = ok(name::SECCOMP) && ok(name::SOCKET) && ok(name::EXEC);
    match (landlock, seccomp) {
        (true, true) => Level::Strict,
        (true, false) => Level::Landlock,
        _ => Level::None,
    }
}

fn set_rlimits(limits: &Limits) -> Result<String, String> {
    let set = |resource, value: u64| {
        rustix::process::setrlimit(
            resource,
            Rlimit {
                current: Some(value),
                maximum: Some(value),
            },
        )
        .map_err(|e| format!("{resource:?}: {e}"))
    };
    set(Resource::Core, 0)?;
    set(Resource::As, limits.memory_bytes)?;
    set(Resource::Cpu, limits.cpu_seconds)?;
    set(Resource::Nofile, limits.max_files)?;
    set(Resource::Fsize, 0)?;
    Ok(format!(
        "core 0, address space {} MiB, CPU {} s, {} descriptors, file size 0",
        limits.memory_bytes >> 20,
        limits.cpu_seconds,
        limits.max_files
    ))
}

/// The newest ABI this code was written and tested against.
const LANDLOCK_ABI: ABI = ABI::V7;

fn landlock(data_dir: &Path) -> (i32, Result<String, String>) {
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))
        .and_then(|r| r.handle_access(AccessNet::from_all(LANDLOCK_ABI)))
        .and_then(|r| r.scope(Scope::from_all(LANDLOCK_ABI)))
        .and_then(|r| r.create())
        .map_err(io)
        .and_then(|r| {
            let dir = PathFd::new(data_dir).map_err(io)?;
            r.add_rule(PathBeneath::new(dir, read)).map_err(io)
        })
        .and_then(|r| r.restrict_self().map_err(io));
    match status {
        Err(e) => (0, Err(e)),
        Ok(s) => {
            let abi = match s.landlock {
                LandlockStatus::Available {
                    effective_abi,
                    kernel_abi,
                } => kernel_abi.unwrap_or(effective_abi as i32),
                _ => 0,
            };
            let result = match s.ruleset {
                RulesetStatus::FullyEnforced => Ok(format!("fully enforced (ABI {abi})")),
                RulesetStatus::PartiallyEnforced => Ok(format!(
                    "partially enforced: the kernel's ABI {abi} lacks some of ABI {}'s rights",
                    LANDLOCK_ABI as i32
                )),
                RulesetStatus::NotEnforced => Err(match s.landlock {
                    LandlockStatus::NotEnabled => {
                        "not enforced: Landlock is built into the kernel but not enabled (add `landlock` to the `lsm=` boot parameter)".to_owned()
                    }
                    LandlockStatus::NotImplemented => {
                        "not enforced: this kernel has no Landlock (Linux 5.13 or later is needed)".to_owned()
                    }
                    _ => "not enforced".to_owned(),
                }),
            };
            (abi, result)
        }
    }
}

fn refused(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::PermissionDenied)
        || matches!(
            e.raw_os_error(),
            Some(libc::EPERM | libc::EACCES | libc::ENOSYS)
        )
}

fn expect_refused<T>(what: std::io::Result<T>) -> Result<String, String> {
    match what {
        Ok(_) => Err("allowed".to_owned()),
        Err(e) if refused(&e) => Ok(format!("refused ({e})")),
        Err(e) => Err(format!("failed for another reason ({e})")),
    }
}

#[allow(
    clippy::disallowed_methods,
    reason = "the self-test must try to start a process, and be refused"
)]
fn self_test(checks: &mut Vec<Check>) {
    step(
        checks,
        name::READ_OUTSIDE,
        expect_refused(std::fs::read_dir("/")),
    );
    step(
        checks,
        name::SOCKET,
        expect_refused(std::net::UdpSocket::bind("127.0.0.1:0")),
    );
    step(
        checks,
        name::EXEC,
        expect_refused(
            std::process::Command::new("/bin/sh")
                .args(["-c", "exit 0"])
                .env_clear()
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status(),
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_parse() {
        assert!(Level::None < Level::Landlock && Level::Landlock < Level::Strict);
        for l in [Level::None, Level::Landlock, Level::Strict] {
            assert_eq!(l.as_str().parse::<Level>(), Ok(l));
        }
        assert!("lax".parse::<Level>().is_err());
    }

    /// Every check, all held, except those named in `failed`.
    fn checks_failing(failed: &[&str]) -> Vec<Check> {
        name::BASE
            .iter()
            .chain(&[
                name::LANDLOCK,
                name::SECCOMP,
                name::READ_OUTSIDE,
                name::SOCKET,
                name::EXEC,
            ])
            .map(|n| Check {
                name: (*n).to_owned(),
                ok: !failed.contains(n),
                detail: String::new(),
            })
            .collect()
    }

    #[test]
    fn the_level_follows_what_held_and_what_the_self_test_saw() {
        assert_eq!(level_of(&checks_failing(&[])), Level::Strict);
        // A kernel without seccomp (or a filter that failed to install).
        assert_eq!(level_of(&checks_failing(&[name::SECCOMP])), Level::Landlock);
        // The filter claims to be in place, but a socket could be opened.
        assert_eq!(level_of(&checks_failing(&[name::SOCKET])), Level::Landlock);
        // A kernel without Landlock: seccomp alone does not confine files.
        assert_eq!(level_of(&checks_failing(&[name::LANDLOCK])), Level::None);
        // Landlock claims enforcement, but `/` could be listed.
        assert_eq!(
            level_of(&checks_failing(&[name::READ_OUTSIDE])),
            Level::None
        );
        // Any base step failing leaves no level at all.
        for base in [name::ENV, name::FDS, name::PDEATHSIG, name::RLIMITS] {
            assert_eq!(level_of(&checks_failing(&[base])), Level::None, "{base}");
        }
        assert_eq!(level_of(&[]), Level::None);
    }

    #[test]
    fn the_seccomp_filters_compile_for_this_machine() {
        let [allow, no_clone3] = crate::seccomp::filters().expect("filters");
        assert!(allow.len() > 50 && !no_clone3.is_empty());
    }
}
