//! veil's integration tests: each starts the real server on loopback and talks
//! to it over Arrow Flight SQL, as operators would.

mod api;
mod arithmetic;
mod audit;
mod bounding;
mod budget;
mod cli;
mod crash;
mod dry_run;
mod equivalence;
mod flight;
mod joins;
mod leaks;
mod ledger;
mod metadata;
mod neighbours;
mod noise;
mod operator_cli;
mod plans;
mod quantiles;
mod rejections;
mod reload;
mod sandbox;
mod selection;
mod slt;
mod support;
mod tls;
mod truncated_joins;
