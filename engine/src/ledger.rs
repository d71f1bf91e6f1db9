//! The privacy-budget ledger: a SQLite file in the state directory.
//!
//! Every query's cost is reserved in one `BEGIN IMMEDIATE` transaction,
//! committed with `synchronous=FULL` in WAL mode, before any data is read. A
//! reservation moves `RESERVED → DISPATCHED → RELEASED | FAILED_AFTER_DISPATCH`;
//! nothing after dispatch lowers what was spent. Amounts are integer
//! micro-units.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::accounting::Budget;
use crate::error::{EngineError, Result};

/// State of one charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeState {
    /// Durably reserved; no data read yet.
    Reserved,
    /// Handed to an executor.
    Dispatched,
    /// A result was released.
    Released,
    /// Execution failed after dispatch; the charge stands.
    FailedAfterDispatch,
}

impl ChargeState {
    fn as_str(self) -> &'static str {
        match self {
            ChargeState::Reserved => "RESERVED",
            ChargeState::Dispatched => "DISPATCHED",
            ChargeState::Released => "RELEASED",
            ChargeState::FailedAfterDispatch => "FAILED_AFTER_DISPATCH",
        }
    }
}

/// A durable reservation.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// Request id the charge is recorded under.
    pub request_id: String,
    /// Spent on the grant including this charge.
    pub spent: Budget,
    /// Total budget of the grant.
    pub total: Budget,
}

impl Reservation {
    /// What remains after this charge.
    pub fn remaining(&self) -> Budget {
        Budget::from_micro(self.total.micro().saturating_sub(self.spent.micro()))
    }
}

/// Why a reservation failed.
#[derive(Debug)]
pub enum ReserveError {
    /// Not enough budget; nothing was written.
    Exhausted {
        /// Spent so far.
        spent: Budget,
    },
    /// The ledger itself failed; fail closed.
    Ledger(String),
}

/// The ledger. One connection behind a mutex: one serialized writer.
pub struct Ledger {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ledger")
    }
}

fn ledger_err(e: rusqlite::Error) -> EngineError {
    EngineError::Unavailable(format!(
        "privacy-budget ledger: {e}; no query is admitted until it is fixed"
    ))
}

impl Ledger {
    /// Opens (creating if needed) `ledger.sqlite` in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Ledger> {
        std::fs::create_dir_all(state_dir).map_err(|e| {
            EngineError::Unavailable(format!("state directory {}: {e}", state_dir.display()))
        })?;
        let conn = Connection::open(state_dir.join("ledger.sqlite")).map_err(ledger_err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;
             CREATE TABLE IF NOT EXISTS charges (
                 seq         INTEGER PRIMARY KEY AUTOINCREMENT,
                 request_id  TEXT    NOT NULL UNIQUE,
                 grant_id    TEXT    NOT NULL,
                 operator    TEXT    NOT NULL,
                 policy_hash TEXT    NOT NULL,
                 unit        TEXT    NOT NULL,
                 cost_micro  INTEGER NOT NULL CHECK (cost_micro > 0),
                 state       TEXT    NOT NULL,
                 created_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
             );
             CREATE INDEX IF NOT EXISTS charges_by_grant ON charges (grant_id, unit);",
        )
        .map_err(ledger_err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(ledger_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(EngineError::Unavailable(format!(
                "privacy-budget ledger: journal mode is {mode}, WAL is required"
            )));
        }
        Ok(Ledger {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| EngineError::Unavailable("privacy-budget ledger lock poisoned".into()))
    }

    /// Reserves `cost` on a grant whose budget is `total`, durably.
    #[allow(clippy::too_many_arguments)]
    pub fn reserve(
        &self,
        request_id: &str,
        grant: &str,
        operator: &str,
        policy_hash: &str,
        unit: &str,
        total: Budget,
        cost: Budget,
    ) -> std::result::Result<Reservation, ReserveError> {
        let mut conn = self
            .lock()
            .map_err(|e| ReserveError::Ledger(e.to_string()))?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| ReserveError::Ledger(e.to_string()))?;
        let spent: i64 = tx
            .query_row(
                "SELECT COALESCE(SUM(cost_micro), 0) FROM charges WHERE grant_id = ?1 AND unit = ?2",
                params![grant, unit],
                |r| r.get(0),
            )
            .map_err(|e| ReserveError::Ledger(e.to_string()))?;
        let spent =
            u64::try_from(spent).map_err(|_| ReserveError::Ledger("negative spend".into()))?;
        let after = spent
            .checked_add(cost.micro())
            .ok_or_else(|| ReserveError::Ledger("budget overflow".into()))?;
        if after > total.micro() {
            return Err(ReserveError::Exhausted {
                spent: Budget::from_micro(spent),
            });
        }
        let cost_i64 = i64::try_from(cost.micro())
            .map_err(|_| ReserveError::Ledger("cost overflow".into()))?;
        tx.execute(
            "INSERT INTO charges (request_id, grant_id, operator, policy_hash, unit, cost_micro, state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![request_id, grant, operator, policy_hash, unit, cost_i64, ChargeState::Reserved.as_str()],
        )
        .map_err(|e| ReserveError::Ledger(e.to_string()))?;
        tx.commit()
            .map_err(|e| ReserveError::Ledger(e.to_string()))?;
        Ok(Reservation {
            request_id: request_id.to_owned(),
            spent: Budget::from_micro(after),
            total,
        })
    }

    /// Moves a charge forward. The amount never changes.
    pub fn advance(&self, request_id: &str, state: ChargeState) -> Result<()> {
        let conn = self.lock()?;
        let changed = conn
            .execute(
                "UPDATE charges SET state = ?2 WHERE request_id = ?1",
                params![request_id, state.as_str()],
            )
            .map_err(ledger_err)?;
        if changed != 1 {
            return Err(EngineError::Internal("charge to advance not found".into()));
        }
        Ok(())
    }

    /// Spent on a grant, in a unit.
    pub fn spent(&self, grant: &str, unit: &str) -> Result<Budget> {
        let conn = self.lock()?;
        let spent: i64 = conn
            .query_row(
                "SELECT COALESCE(SUM(cost_micro), 0) FROM charges WHERE grant_id = ?1 AND unit = ?2",
                params![grant, unit],
                |r| r.get(0),
            )
            .map_err(ledger_err)?;
        Ok(Budget::from_micro(u64::try_from(spent).unwrap_or(u64::MAX)))
    }

    /// Number of charges recorded (all grants).
    pub fn charges(&self) -> Result<u64> {
        let conn = self.lock()?;
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM charges", [], |r| r.get(0))
            .map_err(ledger_err)?;
        Ok(n.max(0) as u64)
    }

    /// State of a charge, if recorded.
    pub fn state(&self, request_id: &str) -> Result<Option<String>> {
        let conn = self.lock()?;
        conn.query_row(
            "SELECT state FROM charges WHERE request_id = ?1",
            params![request_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(ledger_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_until_exhausted_then_refuse_without_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        let total = Budget::total(1.0).expect("ok");
        let cost = Budget::charge(0.25).expect("ok");
        for i in 0..4 {
            let r = ledger
                .reserve(&format!("r{i}"), "G", "op", "h", "epsilon", total, cost)
                .expect("admitted");
            assert_eq!(r.spent.micro(), 250_000 * (i + 1));
        }
        assert!(matches!(
            ledger.reserve("r4", "G", "op", "h", "epsilon", total, cost),
            Err(ReserveError::Exhausted { .. })
        ));
        assert_eq!(ledger.charges().expect("count"), 4);
        // Another grant has its own budget.
        assert!(
            ledger
                .reserve("x", "G2", "op", "h", "epsilon", total, cost)
                .is_ok()
        );
    }

    #[test]
    fn charges_survive_reopen_and_states_advance() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let ledger = Ledger::open(dir.path()).expect("open");
            ledger
                .reserve(
                    "r1",
                    "G",
                    "op",
                    "h",
                    "rho",
                    Budget::total(1.0).expect("ok"),
                    Budget::charge(0.1).expect("ok"),
                )
                .expect("admitted");
            ledger
                .advance("r1", ChargeState::Dispatched)
                .expect("advance");
        }
        let ledger = Ledger::open(dir.path()).expect("reopen");
        assert_eq!(ledger.spent("G", "rho").expect("spent").micro(), 100_000);
        assert_eq!(
            ledger.state("r1").expect("state").as_deref(),
            Some("DISPATCHED")
        );
    }

    #[test]
    fn a_request_id_is_charged_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(dir.path()).expect("open");
        let (t, c) = (
            Budget::total(1.0).expect("ok"),
            Budget::charge(0.1).expect("ok"),
        );
        ledger
            .reserve("same", "G", "op", "h", "rho", t, c)
            .expect("first");
        assert!(matches!(
            ledger.reserve("same", "G", "op", "h", "rho", t, c),
            Err(ReserveError::Ledger(_))
        ));
        assert_eq!(ledger.spent("G", "rho").expect("spent").micro(), 100_000);
    }
}
