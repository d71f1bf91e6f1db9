//! veil's executor sandbox.
//!
//! Executors are the only processes that read raw data. They receive a
//! certified plan and return [`BoundedAggregates`]: exact aggregates in which
//! every privacy unit's contribution has already been bounded. Nothing else
//! crosses the broker⇄executor boundary.
//!
//! Today the executor runs in the broker's process (see ARCHITECTURE.md); this
//! crate holds the wire types both sides agree on, so that moving execution
//! into a confined `veil worker` process changes the transport, not the
//! contract.
//!
//! ```
//! use veil_sandbox::{BoundedAggregates, GroupAggregate, KeyValue};
//! let out = BoundedAggregates {
//!     groups: vec![GroupAggregate { key: vec![KeyValue::Text("东城区".into())], counts: vec![3], sums: vec![120], histograms: vec![] }],
//! };
//! let bytes = out.encode().unwrap();
//! assert_eq!(BoundedAggregates::decode(&bytes).unwrap(), out);
//! ```

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
