//! veil's executor sandbox.
//!
//! Executors are the only processes that read raw data. They receive a
//! certified plan and return [`BoundedAggregates`]: exact aggregates in which
//! every privacy unit's contribution has already been bounded. Nothing else
//! crosses the broker⇄executor boundary.
//!
//! - [`pool`]: the broker's side. It has workers forked ahead of time,
//!   hands each exactly one job over a socketpair, enforces the
//!   deadline with SIGKILL and turns every kind of worker death into one
//!   uniform [`pool::Failure`].
//! - [`worker`]: the executor's side. `veil worker` is a fork server: it
//!   warms up once, without data, and forks one worker per job; each worker
//!   confines itself ([`confine`]) before it opens any data, reports the
//!   level it achieved, runs its one job and exits.
//! - The wire: length-prefixed, size-capped frames ([`write_frame`],
//!   [`read_frame`]) carrying small JSON headers and opaque bodies (the
//!   plan as `datafusion-proto` bytes one way, [`BoundedAggregates`] or an
//!   Arrow IPC stream the other).
//!
//! ```
//! use veil_sandbox::{BoundedAggregates, GroupAggregate, KeyValue};
//! let out = BoundedAggregates {
//!     groups: vec![GroupAggregate { key: vec![KeyValue::Text("东城区".into())], counts: vec![3], sums: vec![120], histograms: vec![] }],
//! };
//! let bytes = out.encode().unwrap();
//! assert_eq!(BoundedAggregates::decode(&bytes).unwrap(), out);
//! ```

pub mod confine;
pub mod pool;
mod seccomp;
mod sys;
pub mod worker;

pub use confine::{Level, Limits, Report};

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Largest message either side accepts, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// One group key component.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum KeyValue {
    /// Integer key.
    Int(i64),
    /// Text key.
    Text(String),
}

/// Exact, bounded aggregates of one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupAggregate {
    /// Group key, one value per GROUP BY column.
    pub key: Vec<KeyValue>,
    /// Counts (of kept rows, non-null values or distinct units), one per
    /// counted statistic.
    pub counts: Vec<i64>,
    /// Fixed-point sums of clamped values, one per summed column.
    pub sums: Vec<i128>,
    /// Per quantile, how many kept values fall on each rank of its
    /// candidate grid.
    pub histograms: Vec<Vec<i64>>,
}

/// The only thing an executor returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundedAggregates {
    /// Non-empty groups; missing keys are empty groups.
    pub groups: Vec<GroupAggregate>,
}

/// A broker⇄executor message could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The message exceeds [`MAX_MESSAGE_BYTES`].
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The bytes are not a valid message.
    #[error("malformed message")]
    Malformed,
    /// The stream ended cleanly before a frame.
    #[error("the other side closed the stream")]
    Closed,
    /// The stream ended inside a frame.
    #[error("the stream ended inside a message")]
    Truncated,
    /// Reading or writing failed.
    #[error("transport error: {0}")]
    Io(std::io::ErrorKind),
}

/// Writes one frame: its length as 4 big-endian bytes, then the bytes.
/// Frames larger than [`MAX_MESSAGE_BYTES`] are refused before anything is
/// written.
pub fn write_frame(w: &mut impl Write, bytes: &[u8]) -> Result<(), WireError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge(bytes.len()));
    }
    let len = u32::try_from(bytes.len()).map_err(|_| WireError::TooLarge(bytes.len()))?;
    w.write_all(&len.to_be_bytes())
        .and_then(|()| w.write_all(bytes))
        .and_then(|()| w.flush())
        .map_err(|e| WireError::Io(e.kind()))
}

/// Reads one frame. A length above [`MAX_MESSAGE_BYTES`] is refused before
/// any of the body is read or allocated: a confused or hostile peer cannot
/// make the reader allocate more than the limit.
pub fn read_frame(r: &mut impl Read) -> Result<Vec<u8>, WireError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(WireError::Closed),
            Ok(0) => return Err(WireError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e.kind())),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => WireError::Truncated,
        kind => WireError::Io(kind),
    })?;
    Ok(body)
}

impl BoundedAggregates {
    /// Serializes the message (JSON; sums as decimal strings keep i128 exact).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let bytes = serde_json::to_vec(self).map_err(|_| WireError::Malformed)?;
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(WireError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    /// Parses a message, refusing oversized input before parsing it.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(WireError::TooLarge(bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(|_| WireError::Malformed)
    }
}

/// The header of a job, sent by the broker and followed by one body frame
/// (the plan).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Correlation id, for data-independent logs.
    pub request: String,
    /// What to run, opaque to this crate (the engine's job description).
    pub spec: String,
}

/// What a worker sends, in order: one `Hello`, then `Done` (followed by one
/// body frame) or `Failed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromWorker {
    /// Confinement is done and no data has been opened: the achieved level.
    Hello(Report),
    /// The job's result follows in one body frame.
    Done,
    /// The job failed; `kind` is a data-independent classification.
    Failed {
        /// For example `execution`, `resources_exhausted`, `decode`.
        kind: String,
    },
    /// Sent by the fork server, not the worker, once it has reaped the
    /// worker: how the process ended (an exit status or a signal). A broker
    /// still waiting for an answer reads this instead.
    Exited {
        /// For example `killed by signal 9`.
        how: String,
    },
}

/// Writes one JSON header frame.
pub fn send_json<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), WireError> {
    let bytes = serde_json::to_vec(msg).map_err(|_| WireError::Malformed)?;
    write_frame(w, &bytes)
}

/// Reads one JSON header frame.
pub fn recv_json<T: serde::de::DeserializeOwned>(r: &mut impl Read) -> Result<T, WireError> {
    serde_json::from_slice(&read_frame(r)?).map_err(|_| WireError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i128_sums_round_trip_exactly() {
        let out = BoundedAggregates {
            groups: vec![GroupAggregate {
                key: vec![KeyValue::Int(7), KeyValue::Text("海淀区".into())],
                counts: vec![i64::MAX, 0],
                sums: vec![i128::MAX, i128::MIN],
                histograms: vec![vec![0, 3, 1]],
            }],
        };
        let bytes = out.encode().expect("encodes");
        assert_eq!(BoundedAggregates::decode(&bytes).expect("decodes"), out);
    }

    #[test]
    fn frames_round_trip_and_refuse_bad_lengths_before_reading() {
        let mut wire = Vec::new();
        for body in [&b""[..], b"plan", &[7u8; 1000]] {
            write_frame(&mut wire, body).expect("write");
        }
        let mut r = &wire[..];
        assert_eq!(read_frame(&mut r).expect("empty"), b"");
        assert_eq!(read_frame(&mut r).expect("plan"), b"plan");
        assert_eq!(read_frame(&mut r).expect("big").len(), 1000);
        assert!(matches!(read_frame(&mut r), Err(WireError::Closed)));
        // A length above the limit is refused without reading the body.
        let huge = (u32::MAX).to_be_bytes();
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(WireError::TooLarge(_))
        ));
        // Cut anywhere inside the second frame (bytes 4..12): truncated,
        // never a shorter message.
        for cut in 5..12 {
            let mut r = &wire[..cut];
            assert_eq!(read_frame(&mut r).expect("the empty frame"), b"");
            assert!(
                matches!(read_frame(&mut r), Err(WireError::Truncated)),
                "cut at {cut}"
            );
        }
        assert!(matches!(
            write_frame(&mut Vec::new(), &vec![0u8; MAX_MESSAGE_BYTES + 1]),
            Err(WireError::TooLarge(_))
        ));
    }

    #[test]
    fn bad_messages_are_rejected() {
        assert!(matches!(
            BoundedAggregates::decode(b"{\"groups\": 3}"),
            Err(WireError::Malformed)
        ));
        assert!(matches!(
            BoundedAggregates::decode(b""),
            Err(WireError::Malformed)
        ));
    }
}
