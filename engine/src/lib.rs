//! veil's engine: from an operator's SQL to a noisy, budgeted answer.
//!
//! The pipeline of one query (see [`Engine::run`]):
//!
//! 1. [`gate`]: one small `SELECT`, nothing else reaches DataFusion;
//! 2. plan on a hand-built session that shows only granted columns
//!    ([`catalog::Catalog::planning_state`]);
//! 3. [`analyze`]: every column's use checked against the grant;
//! 4. [`rewrite::certify`]: contributions bounded, values clamped, sums exact,
//!    producing a [`rewrite::CertifiedPlan`];
//! 5. [`ledger`]: the cost reserved durably on every budget before any data
//!    is read;
//! 6. [`execute`]: the certified plan run, as bytes, in a confined worker
//!    process ([`execute::Executor`]; the only raw-data access);
//! 7. [`mechanisms`]: opendp noise over every public key, a
//!    [`mechanisms::Release`] with 95% intervals;
//! 8. [`audit_log`]: every query, admitted or refused, appended to a hash
//!    chain and Merkle tree with signed checkpoints.
//!
//! ```no_run
//! # async fn demo() -> Result<(), veil_engine::EngineError> {
//! use std::sync::Arc;
//! let policy = Arc::new(veil_policy::Policy::load("examples/beijing/policy.toml".as_ref()).unwrap());
//! let catalog = veil_engine::catalog::Catalog::open(&policy, "examples/beijing/data".as_ref())?;
//! let ledger = veil_engine::ledger::Ledger::open("/tmp/veil-state".as_ref())?;
//! let audit = veil_engine::audit_log::AuditLog::open("/tmp/veil-state".as_ref(), Default::default())?;
//! // Benchmarks and engine tests run plans in process; `veil serve` uses
//! // `Executor::Sandboxed` with a pool of confined workers.
//! let executor = veil_engine::Executor::InProcess;
//! let engine = veil_engine::Engine::new(policy, catalog, ledger, audit, executor);
//! let now = chrono::Utc::now().fixed_offset();
//! let answer = engine
//!     .run("op-univ-07", "SELECT district, COUNT(*) FROM pop.residents GROUP BY district", now)
//!     .await?;
//! assert_eq!(answer.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 16);
//! # Ok(()) }
//! ```

pub mod accounting;
pub mod analyze;
#[cfg(any(test, feature = "test-hooks"))]
pub mod audit;
pub mod audit_log;
mod bounded_sample;
pub mod broker;
pub mod catalog;
mod clamp;
pub mod dp_interval;
mod error;
pub mod execute;
pub mod gate;
mod keyed_hash;
pub mod ledger;
pub mod listing;
pub mod mechanisms;
pub mod plan_codec;
pub mod quantile_grid;
pub mod rewrite;

pub use broker::{Answer, Engine, Estimate, meta};
pub use error::{EngineError, Result, Rule};
pub use execute::Executor;
