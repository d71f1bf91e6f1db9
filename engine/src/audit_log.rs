//! The tamper-evident audit log (审计日志): one entry per query, admitted or
//! refused, in the state directory.
//!
//! - `audit.log`: one JSON entry per line. Each names the SHA-256 of the
//!   line before it (`prev`), so the entries form a hash chain.
//! - The entries are also the leaves of a Merkle tree in the style of RFC
//!   6962/9162 (leaf `SHA-256(0x00 ‖ line)`, node `SHA-256(0x01 ‖ l ‖ r)`,
//!   split at the largest power of two). The server keeps the whole tree in
//!   memory, so a root or an inclusion proof never re-reads the log.
//! - `audit.checkpoints`: signed checkpoints, one JSON object per line: the
//!   tree size, root and time, signed with Ed25519 by the key in `audit.key`
//!   (public half in `audit.pub`). A checkpoint follows every
//!   `checkpoint_every` entries, or the first entry after
//!   `checkpoint_seconds`; each response's receipt names its entry and the
//!   latest checkpoint.
//!
//! [`verify`] re-reads everything: the chain, every entry's index, every
//! checkpoint's root against the tree of that size, every signature, and
//! that the log is at least as long as the latest checkpoint (a truncated
//! tail; entries after the latest checkpoint are protected by the chain
//! only, which is why the default cadence signs after every entry). The
//! server verifies at start and refuses to serve a tampered log; afterwards
//! it answers receipts and proofs from its own tree, reading only the one
//! entry asked for and checking it against its leaf.
//! Entries never carry raw data or results: the result is a hash.
//!
//! Limits, by design: whoever can rewrite the state directory can also sign
//! a consistent shorter history with the key there; receipts handed to
//! clients (and checkpoints published under 授权运营情况披露) are what make
//! such a rewrite detectable from outside.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

/// One audit entry, as written (without its `index` and `prev`, which the
/// log assigns).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Entry {
    /// When the query was answered or refused (RFC 3339).
    pub time: String,
    /// Operator.
    pub operator: String,
    /// Grant, once known.
    pub grant: Option<String>,
    /// The grant's purpose.
    pub purpose: Option<String>,
    /// Hash of the policy in force.
    pub policy: String,
    /// Datasets read.
    pub datasets: Vec<String>,
    /// SHA-256 of the normalized query text.
    pub query_hash: String,
    /// The query text, unless withheld.
    pub query: Option<String>,
    /// `released`, `replayed` or `refused`.
    pub decision: String,
    /// The rule code of a refusal.
    pub rule: Option<String>,
    /// Cost charged (0 for public data, refusals and replays).
    pub cost: f64,
    /// `epsilon`, `rho`, or empty.
    pub unit: String,
    /// Request id.
    pub request: String,
    /// SHA-256 of the answer as sent (Arrow IPC), never the answer.
    pub result_hash: Option<String>,
    /// Where the query ran: the sandbox level.
    pub sandbox: String,
}

/// An entry as stored: its position and the hash of the line before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// Position in the log, from 0.
    pub index: u64,
    /// SHA-256 (hex) of the previous line; zeros for the first.
    pub prev: String,
    /// The entry.
    #[serde(flatten)]
    pub entry: Entry,
}

/// A signed checkpoint: the tree of the first `size` entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Number of entries covered.
    pub size: u64,
    /// Merkle root (hex).
    pub root: String,
    /// When it was signed (RFC 3339).
    pub time: String,
    /// Ed25519 signature (hex) of [`Checkpoint::message`].
    pub signature: String,
}

impl Checkpoint {
    /// The signed text.
    pub fn message(size: u64, root: &str, time: &str) -> String {
        format!("veil audit checkpoint v1\n{size}\n{root}\n{time}\n")
    }
}

/// What a response carries: its entry and the latest checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// The entry's index.
    pub index: u64,
    /// The latest signed checkpoint.
    pub checkpoint: Checkpoint,
}

/// An inclusion proof (RFC 6962 audit path) of one entry in a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InclusionProof {
    /// The entry's index.
    pub index: u64,
    /// The entry's leaf hash (hex).
    pub leaf: String,
    /// Sibling hashes from the leaf up (hex).
    pub path: Vec<String>,
    /// The checkpoint proved against.
    pub checkpoint: Checkpoint,
}

type Hash = [u8; 32];

fn leaf_hash(line: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(line);
    h.finalize().into()
}

fn node_hash(l: &Hash, r: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(l);
    h.update(r);
    h.finalize().into()
}

fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The Merkle tree, kept whole: `levels[h][j]` is the root of the perfect
/// subtree over leaves `j·2^h .. (j+1)·2^h`, for every such subtree that is
/// complete. Appending is amortized O(1); any root or audit path takes
/// O(log² n) hashes, whatever the tree's size. About 64 bytes per entry.
#[derive(Debug, Clone, Default)]
struct Tree {
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    fn push(&mut self, leaf: Hash) {
        let mut node = leaf;
        for h in 0.. {
            if self.levels.len() == h {
                self.levels.push(Vec::new());
            }
            let level = &mut self.levels[h];
            level.push(node);
            let n = level.len();
            if n % 2 == 1 {
                break;
            }
            node = node_hash(&level[n - 2], &level[n - 1]);
        }
    }

    fn size(&self) -> usize {
        self.levels.first().map_or(0, Vec::len)
    }

    /// RFC 6962 MTH of leaves `lo..hi` (`hi` at most the size). Its left
    /// halves are always perfect subtrees, read from `levels`.
    fn subtree(&self, lo: usize, hi: usize) -> Hash {
        let n = hi - lo;
        if n == 0 {
            return empty_root();
        }
        if n.is_power_of_two() && lo.is_multiple_of(n) {
            return self.levels[n.trailing_zeros() as usize][lo / n];
        }
        let k = split(n);
        node_hash(&self.subtree(lo, lo + k), &self.subtree(lo + k, hi))
    }

    /// The root of the first `size` leaves.
    fn root(&self, size: usize) -> Hash {
        self.subtree(0, size)
    }

    /// RFC 6962 PATH(m, D[0:size]), from the leaf up.
    fn path(&self, m: usize, size: usize) -> Vec<Hash> {
        let mut out = Vec::new();
        self.path_within(m, 0, size, &mut out);
        out
    }

    fn path_within(&self, m: usize, lo: usize, hi: usize, out: &mut Vec<Hash>) {
        if hi - lo <= 1 {
            return;
        }
        let k = lo + split(hi - lo);
        if m < k {
            self.path_within(m, lo, k, out);
            out.push(self.subtree(k, hi));
        } else {
            self.path_within(m, k, hi, out);
            out.push(self.subtree(lo, k));
        }
    }

    /// An inclusion proof of leaf `index` in `checkpoint`, if it covers it.
    fn prove(
        &self,
        index: u64,
        checkpoint: Option<Checkpoint>,
    ) -> std::result::Result<InclusionProof, String> {
        let checkpoint = checkpoint
            .filter(|c| index < c.size && c.size as usize <= self.size())
            .ok_or(format!("no checkpoint covers entry {index} yet"))?;
        let i = index as usize;
        Ok(InclusionProof {
            index,
            leaf: hex::encode(self.levels[0][i]),
            path: self
                .path(i, checkpoint.size as usize)
                .iter()
                .map(hex::encode)
                .collect(),
            checkpoint,
        })
    }
}

/// The largest power of two below `n` (n ≥ 2).
fn split(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// Recomputes a root from a leaf and its audit path (RFC 9162 §2.1.3.2).
pub fn root_from_path(index: u64, size: u64, leaf: &Hash, path: &[Hash]) -> Option<Hash> {
    if index >= size {
        return None;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf;
    for p in path {
        if s_n == 0 {
            return None;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            while f_n & 1 == 0 && f_n != 0 {
                f_n >>= 1;
                s_n >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    (s_n == 0).then_some(r)
}

fn unhex(s: &str) -> Option<Hash> {
    hex::decode(s).ok()?.try_into().ok()
}

/// How often to sign checkpoints.
#[derive(Debug, Clone, Copy)]
pub struct Cadence {
    /// After this many entries (at least 1).
    pub entries: u64,
    /// Or the first entry after this many seconds.
    pub seconds: u64,
}

impl Default for Cadence {
    /// Every entry: a response's receipt then always covers its own entry.
    fn default() -> Self {
        Cadence {
            entries: 1,
            seconds: 60,
        }
    }
}

struct Inner {
    log: File,
    checkpoints: File,
    key: SigningKey,
    tree: Tree,
    /// Where each entry's line starts in `audit.log`, and where the next will.
    starts: Vec<u64>,
    end: u64,
    size: u64,
    last: Hash,
    latest: Option<Checkpoint>,
    since_checkpoint: u64,
    signed_at: std::time::Instant,
    failed: Option<String>,
}

/// The audit log of one state directory.
pub struct AuditLog {
    dir: PathBuf,
    cadence: Cadence,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

pub(crate) fn unavailable(why: impl std::fmt::Display) -> EngineError {
    EngineError::closed("audit log", why)
}

/// The files of a state directory's audit log.
fn paths(dir: &Path) -> [PathBuf; 4] {
    [
        dir.join("audit.log"),
        dir.join("audit.checkpoints"),
        dir.join("audit.key"),
        dir.join("audit.pub"),
    ]
}

/// Reads `audit.pub`.
fn verifying_key(dir: &Path) -> std::result::Result<VerifyingKey, String> {
    let text = std::fs::read_to_string(dir.join("audit.pub"))
        .map_err(|e| format!("cannot read audit.pub: {e}"))?;
    let bytes: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("audit.pub is not a 32-byte hex key")?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| "audit.pub is not an Ed25519 key".into())
}

/// What verification found: the tree's state, or the first problem.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Entries in the log.
    pub size: u64,
    /// Current root.
    pub root: String,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// The latest checkpoint.
    pub latest: Option<Checkpoint>,
    /// A partial last line was ignored (a crash while appending).
    pub torn: bool,
    tree: Tree,
    starts: Vec<u64>,
    end: u64,
    last: Hash,
}

/// Checks the whole log of a state directory (see the module
/// documentation); the error names the first problem and where it is.
pub fn verify(dir: &Path) -> std::result::Result<Verified, String> {
    let [log, checkpoints, _, _] = paths(dir);
    let key = if dir.join("audit.pub").exists() || log.exists() {
        Some(verifying_key(dir)?)
    } else {
        None
    };
    let mut ckpts = Vec::new();
    let (checkpoint_lines, torn_checkpoint) = lines(&checkpoints)?;
    for (i, line) in checkpoint_lines.iter().enumerate() {
        {
            let c: Checkpoint = serde_json::from_slice(line)
                .map_err(|_| format!("checkpoint {i} is not valid JSON"))?;
            let sig = hex::decode(&c.signature)
                .ok()
                .and_then(|b| Signature::from_slice(&b).ok())
                .ok_or(format!("checkpoint {i} has a malformed signature"))?;
            let key = key.as_ref().ok_or("checkpoints without a key")?;
            key.verify(
                Checkpoint::message(c.size, &c.root, &c.time).as_bytes(),
                &sig,
            )
            .map_err(|_| format!("checkpoint {i} (size {}) has a bad signature", c.size))?;
            if let Some(prev) = ckpts.last().map(|p: &Checkpoint| p.size)
                && c.size < prev
            {
                return Err(format!(
                    "checkpoint {i} goes back from size {prev} to {}",
                    c.size
                ));
            }
            ckpts.push(c);
        }
    }
    let mut tree = Tree::default();
    let mut starts = Vec::new();
    let mut end = 0u64;
    let mut last = [0u8; 32];
    let mut size = 0u64;
    let mut next = ckpts.iter().peekable();
    let check = |tree: &Tree,
                 size: u64,
                 next: &mut std::iter::Peekable<std::slice::Iter<'_, Checkpoint>>| {
        while let Some(c) = next.next_if(|c| c.size == size) {
            if c.root != hex::encode(tree.root(size as usize)) {
                return Err(format!(
                    "the entries do not match checkpoint of size {}: an entry was changed, removed or reordered",
                    c.size
                ));
            }
        }
        Ok(())
    };
    check(&tree, 0, &mut next)?;
    let (entry_lines, torn_entry) = lines(&log)?;
    {
        for line in &entry_lines {
            let stored: Stored = serde_json::from_slice(line)
                .map_err(|_| format!("entry {size} is not a valid entry"))?;
            if stored.index != size {
                return Err(format!(
                    "entry {size} says it is entry {}: entries were removed or reordered",
                    stored.index
                ));
            }
            if stored.prev != hex::encode(last) {
                return Err(format!(
                    "entry {size} does not follow the entry before it: the hash chain is broken"
                ));
            }
            last = Sha256::digest(line).into();
            tree.push(leaf_hash(line));
            starts.push(end);
            end += line.len() as u64 + 1;
            size += 1;
            check(&tree, size, &mut next)?;
        }
    }
    if let Some(c) = next.next() {
        return Err(format!(
            "the log has {size} entries but a checkpoint covers {}: its tail was cut off",
            c.size
        ));
    }
    Ok(Verified {
        size,
        root: hex::encode(tree.root(size as usize)),
        checkpoints: ckpts.len() as u64,
        latest: ckpts.last().cloned(),
        torn: torn_entry || torn_checkpoint,
        tree,
        starts,
        end,
        last,
    })
}

/// A file's complete lines (without their line ends), and whether it ends
/// in a partial line: what a crash in the middle of an append leaves. That
/// line was never synced, so no answer or checkpoint depends on it.
fn lines(path: &Path) -> std::result::Result<(Vec<Vec<u8>>, bool), String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((vec![], false)),
        Err(e) => return Err(format!("{name}: {e}")),
    };
    let mut out: Vec<Vec<u8>> = bytes.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
    // After the last line end: empty, or a partial line.
    let tail = out.pop().unwrap_or_default();
    Ok((out, !tail.is_empty()))
}

/// Cuts a partial last line off a file (see [`lines`]).
fn drop_partial_line(path: &Path) -> std::io::Result<()> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if keep < bytes.len() {
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(keep as u64)?;
        f.sync_all()?;
    }
    Ok(())
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl AuditLog {
    /// Opens the audit log of a state directory, creating it (and its
    /// signing key) if needed, after verifying everything in it.
    pub fn open(dir: &Path, cadence: Cadence) -> Result<AuditLog> {
        std::fs::create_dir_all(dir).map_err(unavailable)?;
        let [log, checkpoints, key_path, pub_path] = paths(dir);
        if !key_path.exists() {
            if log.exists() {
                return Err(unavailable("audit.key is missing beside audit.log"));
            }
            let mut seed = [0u8; 32];
            opendp::traits::samplers::fill_bytes(&mut seed)
                .map_err(|_| unavailable("no randomness for the signing key"))?;
            write_private(&key_path, hex::encode(seed).as_bytes())?;
            let public = SigningKey::from_bytes(&seed).verifying_key();
            std::fs::write(&pub_path, hex::encode(public.as_bytes()) + "\n")
                .map_err(unavailable)?;
        }
        let seed: [u8; 32] = std::fs::read_to_string(&key_path)
            .ok()
            .and_then(|t| hex::decode(t.trim()).ok())
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| unavailable("audit.key is not a 32-byte hex seed"))?;
        let key = SigningKey::from_bytes(&seed);
        if verifying_key(dir).map_err(unavailable)? != key.verifying_key() {
            return Err(unavailable("audit.pub does not match audit.key"));
        }
        let verified =
            verify(dir).map_err(|why| unavailable(format!("tampering detected: {why}")))?;
        if verified.torn {
            tracing::warn!(
                "the audit log ended in a partial line (a crash while appending); it was cut off"
            );
            drop_partial_line(&log).map_err(unavailable)?;
            drop_partial_line(&checkpoints).map_err(unavailable)?;
        }
        let append = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(unavailable)
        };
        Ok(AuditLog {
            dir: dir.to_owned(),
            cadence,
            inner: Mutex::new(Inner {
                log: append(&log)?,
                checkpoints: append(&checkpoints)?,
                key,
                tree: verified.tree,
                starts: verified.starts,
                end: verified.end,
                size: verified.size,
                last: verified.last,
                latest: verified.latest,
                since_checkpoint: 0,
                signed_at: std::time::Instant::now(),
                failed: None,
            }),
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Why the log admits nothing, if a write failed since it opened.
    pub fn failure(&self) -> Option<String> {
        match self.inner.lock() {
            Ok(i) => i.failed.clone(),
            Err(_) => Some("the audit log lock is poisoned".into()),
        }
    }

    fn lock(&self) -> std::result::Result<std::sync::MutexGuard<'_, Inner>, String> {
        self.inner
            .lock()
            .map_err(|_| "the audit log lock is poisoned".to_owned())
    }

    /// Entry `index` and its line as stored, or `None` past the end. The
    /// line is read alone and checked against the tree: an entry changed
    /// since the log was opened is an error, never an answer.
    pub fn entry(&self, index: u64) -> std::result::Result<Option<(Stored, Vec<u8>)>, String> {
        use std::os::unix::fs::FileExt;
        let inner = self.lock()?;
        let Some(i) = usize::try_from(index)
            .ok()
            .filter(|i| *i < inner.starts.len())
        else {
            return Ok(None);
        };
        let start = inner.starts[i];
        let end = inner.starts.get(i + 1).copied().unwrap_or(inner.end) - 1;
        let mut line = vec![0u8; (end - start) as usize];
        File::open(self.dir.join("audit.log"))
            .and_then(|f| f.read_exact_at(&mut line, start))
            .map_err(|e| format!("reading audit.log: {e}"))?;
        if leaf_hash(&line) != inner.tree.levels[0][i] {
            return Err(format!(
                "tampering detected: entry {index} changed after the log was opened"
            ));
        }
        let stored = serde_json::from_slice(&line)
            .map_err(|_| format!("entry {index} is not a valid entry"))?;
        Ok(Some((stored, line)))
    }

    /// The latest signed checkpoint.
    pub fn latest(&self) -> std::result::Result<Option<Checkpoint>, String> {
        Ok(self.lock()?.latest.clone())
    }

    /// An inclusion proof of entry `index` in the latest checkpoint that
    /// covers it, from the tree kept in memory.
    pub fn prove(&self, index: u64) -> std::result::Result<InclusionProof, String> {
        let inner = self.lock()?;
        inner.tree.prove(index, inner.latest.clone())
    }

    /// Appends an entry durably (written and synced) and returns its
    /// receipt. A failure marks the log failed: nothing is admitted after.
    pub fn append(&self, entry: Entry) -> Result<Receipt> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| unavailable("the audit log lock is poisoned"))?;
        if let Some(why) = &inner.failed {
            return Err(unavailable(why));
        }
        match inner.append(entry, self.cadence) {
            Ok(r) => Ok(r),
            Err(why) => {
                tracing::error!(error = %why, "the audit log failed; admitting no query");
                inner.failed = Some(why.clone());
                Err(unavailable(why))
            }
        }
    }
}

impl Inner {
    fn append(&mut self, entry: Entry, cadence: Cadence) -> std::result::Result<Receipt, String> {
        let stored = Stored {
            index: self.size,
            prev: hex::encode(self.last),
            entry,
        };
        let mut line = serde_json::to_vec(&stored).map_err(|e| e.to_string())?;
        let hash: Hash = Sha256::digest(&line).into();
        line.push(b'\n');
        self.log
            .write_all(&line)
            .map_err(|e| format!("writing audit.log: {e}"))?;
        self.log
            .sync_data()
            .map_err(|e| format!("syncing audit.log: {e}"))?;
        self.starts.push(self.end);
        self.end += line.len() as u64;
        line.pop();
        self.tree.push(leaf_hash(&line));
        self.last = hash;
        self.size += 1;
        self.since_checkpoint += 1;
        let due = self.since_checkpoint >= cadence.entries.max(1)
            || self.signed_at.elapsed().as_secs() >= cadence.seconds
            || self.latest.is_none();
        if due {
            let time = now_rfc3339();
            let root = hex::encode(self.tree.root(self.tree.size()));
            let signature = self
                .key
                .sign(Checkpoint::message(self.size, &root, &time).as_bytes());
            let c = Checkpoint {
                size: self.size,
                root,
                time,
                signature: hex::encode(signature.to_bytes()),
            };
            let mut text = serde_json::to_vec(&c).map_err(|e| e.to_string())?;
            text.push(b'\n');
            self.checkpoints
                .write_all(&text)
                .and_then(|()| self.checkpoints.sync_data())
                .map_err(|e| format!("writing audit.checkpoints: {e}"))?;
            self.latest = Some(c);
            self.since_checkpoint = 0;
            self.signed_at = std::time::Instant::now();
        }
        Ok(Receipt {
            index: self.size - 1,
            checkpoint: self.latest.clone().ok_or("no checkpoint after an append")?,
        })
    }
}

/// Writes a file only its owner may read.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path).map_err(unavailable)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(unavailable)
}

/// Every entry of a state directory's log, in order, with its line.
pub fn entries(dir: &Path) -> std::result::Result<Vec<(Stored, Vec<u8>)>, String> {
    let (lines, _) = lines(&dir.join("audit.log"))?;
    lines
        .into_iter()
        .enumerate()
        .map(|(i, line)| {
            let stored: Stored = serde_json::from_slice(&line)
                .map_err(|_| format!("entry {i} is not a valid entry"))?;
            Ok((stored, line))
        })
        .collect()
}

/// An inclusion proof of entry `index` in the latest checkpoint that covers
/// it, after verifying the whole log (offline; a server answers from
/// [`AuditLog::prove`]).
pub fn prove(dir: &Path, index: u64) -> std::result::Result<InclusionProof, String> {
    let verified = verify(dir)?;
    verified.tree.prove(index, verified.latest)
}

/// Checks an inclusion proof against its checkpoint's root.
pub fn check_proof(proof: &InclusionProof) -> bool {
    let (Some(leaf), Some(root)) = (unhex(&proof.leaf), unhex(&proof.checkpoint.root)) else {
        return false;
    };
    let Some(path) = proof
        .path
        .iter()
        .map(|p| unhex(p))
        .collect::<Option<Vec<_>>>()
    else {
        return false;
    };
    root_from_path(proof.index, proof.checkpoint.size, &leaf, &path) == Some(root)
}

/// Entries as one Arrow batch (for Parquet export), one row per entry.
pub fn export_batch(entries: &[Stored]) -> Result<datafusion::arrow::array::RecordBatch> {
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, Float64Array, StringArray, UInt64Array};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    let text = |f: &dyn Fn(&Stored) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from(entries.iter().map(f).collect::<Vec<_>>()))
    };
    let columns: Vec<(&str, ArrayRef)> = vec![
        (
            "index",
            Arc::new(UInt64Array::from_iter_values(
                entries.iter().map(|e| e.index),
            )),
        ),
        ("prev", text(&|e| Some(e.prev.clone()))),
        ("time", text(&|e| Some(e.entry.time.clone()))),
        ("operator", text(&|e| Some(e.entry.operator.clone()))),
        ("grant", text(&|e| e.entry.grant.clone())),
        ("purpose", text(&|e| e.entry.purpose.clone())),
        ("policy", text(&|e| Some(e.entry.policy.clone()))),
        ("datasets", text(&|e| Some(e.entry.datasets.join(",")))),
        ("query_hash", text(&|e| Some(e.entry.query_hash.clone()))),
        ("query", text(&|e| e.entry.query.clone())),
        ("decision", text(&|e| Some(e.entry.decision.clone()))),
        ("rule", text(&|e| e.entry.rule.clone())),
        (
            "cost",
            Arc::new(Float64Array::from_iter_values(
                entries.iter().map(|e| e.entry.cost),
            )),
        ),
        ("unit", text(&|e| Some(e.entry.unit.clone()))),
        ("request", text(&|e| Some(e.entry.request.clone()))),
        ("result_hash", text(&|e| e.entry.result_hash.clone())),
        ("sandbox", text(&|e| Some(e.entry.sandbox.clone()))),
    ];
    let schema = Schema::new(
        columns
            .iter()
            .map(|(name, a)| {
                let nullable = a.null_count() > 0 || *a.data_type() == DataType::Utf8;
                Field::new(*name, a.data_type().clone(), nullable)
            })
            .collect::<Vec<_>>(),
    );
    datafusion::arrow::array::RecordBatch::try_new(
        Arc::new(schema),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .map_err(|e| EngineError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn entry(i: usize) -> Entry {
        Entry {
            time: format!("2026-11-27T12:00:{:02}Z", i % 60),
            operator: "op-univ-07".into(),
            decision: if i.is_multiple_of(3) {
                "refused"
            } else {
                "released"
            }
            .into(),
            request: format!("r{i}"),
            query: Some(format!("SELECT COUNT(*) FROM wjw.outpatient_visits -- {i}")),
            sandbox: "in-process".into(),
            ..Entry::default()
        }
    }

    fn log_with(n: usize, cadence: Cadence) -> (tempfile::TempDir, Vec<Receipt>) {
        let dir = tempfile::tempdir().expect("tmp");
        let log = AuditLog::open(dir.path(), cadence).expect("open");
        let receipts = (0..n)
            .map(|i| log.append(entry(i)).expect("append"))
            .collect();
        (dir, receipts)
    }

    /// RFC 6962 MTH of a slice of leaf hashes, as the RFC writes it.
    fn subtree_root(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split(n);
                node_hash(&subtree_root(&leaves[..k]), &subtree_root(&leaves[k..]))
            }
        }
    }

    /// RFC 6962 PATH(m, D[n]), as the RFC writes it.
    fn audit_path(m: usize, leaves: &[Hash]) -> Vec<Hash> {
        let n = leaves.len();
        if n <= 1 {
            return vec![];
        }
        let k = split(n);
        if m < k {
            let mut p = audit_path(m, &leaves[..k]);
            p.push(subtree_root(&leaves[k..]));
            p
        } else {
            let mut p = audit_path(m - k, &leaves[k..]);
            p.push(subtree_root(&leaves[..k]));
            p
        }
    }

    proptest! {
        /// Every root and audit path of the kept tree equals RFC 6962's
        /// recursive definition, for every size it passes through, and
        /// every path proves its leaf and no other.
        #[test]
        fn roots_and_paths_agree_with_the_rfc(n in 1usize..70) {
            let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(&i.to_le_bytes())).collect();
            let mut tree = Tree::default();
            for l in &leaves {
                tree.push(*l);
            }
            prop_assert_eq!(tree.size(), n);
            for size in 0..=n {
                prop_assert_eq!(tree.root(size), subtree_root(&leaves[..size]));
            }
            let root = tree.root(n);
            for m in 0..n {
                let path = tree.path(m, n);
                prop_assert_eq!(&path, &audit_path(m, &leaves));
                prop_assert_eq!(root_from_path(m as u64, n as u64, &leaves[m], &path), Some(root));
                let other = leaf_hash(b"other");
                prop_assert_ne!(root_from_path(m as u64, n as u64, &other, &path), Some(root));
            }
        }
    }

    #[test]
    fn receipts_cover_their_entry_and_proofs_check() {
        let (dir, receipts) = log_with(13, Cadence::default());
        for (i, r) in receipts.iter().enumerate() {
            assert_eq!(r.index, i as u64);
            assert_eq!(r.checkpoint.size, i as u64 + 1);
        }
        let verified = verify(dir.path()).expect("intact");
        assert_eq!((verified.size, verified.checkpoints), (13, 13));
        for i in 0..13 {
            let proof = prove(dir.path(), i).expect("proof");
            assert!(check_proof(&proof));
        }
        // Reopening continues the chain.
        let log = AuditLog::open(dir.path(), Cadence::default()).expect("reopen");
        assert_eq!(log.append(entry(13)).expect("append").index, 13);
        assert_eq!(verify(dir.path()).expect("intact").size, 14);
    }

    /// A server's receipts and proofs, answered from its own tree, match
    /// what offline verification gives, before and after reopening, with
    /// sparse checkpoints too; an entry changed behind the server's back is
    /// refused, not served.
    #[test]
    fn the_servers_answers_match_the_offline_ones_and_catch_later_tampering() {
        let cadence = Cadence {
            entries: 4,
            seconds: 3600,
        };
        let (dir, _) = log_with(9, cadence);
        let log = AuditLog::open(dir.path(), cadence).expect("reopen");
        for i in 9..11 {
            log.append(entry(i)).expect("append");
        }
        // Checkpoints at 1 (the first entry), 5 and 9 of 11 entries.
        assert_eq!(log.latest().expect("latest").map(|c| c.size), Some(9));
        let lines = entries(dir.path()).expect("entries");
        for i in 0..11u64 {
            let (stored, line) = log.entry(i).expect("read").expect("present");
            assert_eq!((stored.index, &line), (i, &lines[i as usize].1));
            match prove(dir.path(), i) {
                Ok(offline) => {
                    let online = log.prove(i).expect("covered");
                    assert_eq!(online, offline);
                    assert!(check_proof(&online));
                }
                Err(e) => {
                    assert!(i >= 9 && e.starts_with("no checkpoint covers"), "{e}");
                    assert_eq!(log.prove(i).expect_err("not covered"), e);
                }
            }
        }
        assert_eq!(log.entry(11).expect("read"), None);
        assert_eq!(log.entry(u64::MAX).expect("read"), None);

        let path = dir.path().join("audit.log");
        let text = std::fs::read(&path).expect("read");
        let at = text.iter().position(|b| *b == b'S').expect("query text");
        let mut changed = text.clone();
        changed[at] = b'X';
        std::fs::write(&path, changed).expect("write");
        assert!(
            log.entry(0)
                .expect_err("tampered")
                .contains("tampering detected")
        );
    }

    /// Every kind of tampering is caught, with checkpoints every entry or
    /// only every five.
    #[test]
    fn tampering_is_detected() {
        type Tamper = fn(&mut Vec<Vec<u8>>);
        let attacks: [(&str, Tamper); 5] = [
            ("flip a byte", |lines| {
                let l = &mut lines[3];
                let at = l.iter().position(|b| *b == b'S').expect("query text");
                l[at] = b'X';
            }),
            ("delete an entry", |lines| {
                lines.remove(4);
            }),
            // Past the latest checkpoint (every five entries: 6 of 10).
            ("truncate the tail", |lines| {
                lines.truncate(lines.len() - 5);
            }),
            ("swap two entries", |lines| lines.swap(2, 5)),
            ("rewrite an index to hide a deletion", |lines| {
                lines.remove(1);
                for (i, l) in lines.iter_mut().enumerate() {
                    let mut s: Stored = serde_json::from_slice(l).expect("entry");
                    s.index = i as u64;
                    *l = serde_json::to_vec(&s).expect("json");
                }
            }),
        ];
        for cadence in [
            Cadence::default(),
            Cadence {
                entries: 5,
                seconds: 3600,
            },
        ] {
            for (name, attack) in attacks {
                let (dir, _) = log_with(10, cadence);
                let path = dir.path().join("audit.log");
                let text = std::fs::read(&path).expect("read");
                let mut lines: Vec<Vec<u8>> = text
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect();
                attack(&mut lines);
                let mut out = lines.join(&b'\n');
                out.push(b'\n');
                std::fs::write(&path, out).expect("write");
                let err = verify(dir.path()).expect_err(name);
                assert!(!err.is_empty());
                assert!(
                    AuditLog::open(dir.path(), cadence).is_err(),
                    "{name}: opening must refuse a tampered log"
                );
            }
        }
    }

    #[test]
    fn a_partial_last_line_from_a_crash_is_cut_off_but_a_cut_entry_is_not() {
        let (dir, _) = log_with(4, Cadence::default());
        let path = dir.path().join("audit.log");
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"{\"index\":4,\"prev\":\"ab").expect("partial");
        drop(f);
        let v = verify(dir.path()).expect("a crash artifact, not tampering");
        assert!(v.torn && v.size == 4);
        let log = AuditLog::open(dir.path(), Cadence::default()).expect("repaired");
        assert_eq!(log.append(entry(4)).expect("append").index, 4);
        assert!(!verify(dir.path()).expect("intact").torn);
        // Cutting into a checkpointed entry is tampering.
        let text = std::fs::read(&path).expect("read");
        std::fs::write(&path, &text[..text.len() - 10]).expect("cut");
        assert!(verify(dir.path()).expect_err("cut").contains("cut off"));
    }

    #[test]
    fn a_forged_checkpoint_is_detected() {
        let (dir, _) = log_with(3, Cadence::default());
        let path = dir.path().join("audit.checkpoints");
        let text = std::fs::read_to_string(&path).expect("read");
        let forged = text.replacen("\"size\":2", "\"size\":1", 1);
        assert_ne!(forged, text);
        std::fs::write(&path, forged).expect("write");
        assert!(
            verify(dir.path())
                .expect_err("forged")
                .contains("signature")
        );
    }
}
