//! What an operator may see of the catalog: the datasets and columns its
//! grants in force expose, never more.
//!
//! Flight SQL's `GetTables`, `veil.v1.ListGrants` and `veil catalog` all read
//! this one listing, so a client sees exactly what the planner would accept.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, FixedOffset};
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use veil_policy::{Domain, Policy, Use};

use crate::catalog::{CATALOG, Catalog};
use crate::error::Result;

/// Metadata keys of a listed table and its columns.
pub mod keys {
    /// Table: the dataset's human name.
    pub const NAME: &str = "veil.dataset_name";
    /// Table and column: grading level (分级).
    pub const LEVEL: &str = "veil.level";
    /// Table: `true` when answered exactly (public data), `false` under DP.
    pub const PUBLIC: &str = "veil.public";
    /// Table: the grants (comma-separated ids) that expose it.
    pub const GRANTS: &str = "veil.grants";
    /// Table: the mandatory row filter of the operator's grant, if any.
    pub const ROW_FILTER: &str = "veil.row_filter";
    /// Table: the privacy unit's column.
    pub const UNIT: &str = "veil.privacy_unit";
    /// Column: allowed uses (comma-separated policy spelling).
    pub const USES: &str = "veil.uses";
    /// Column: declared bounds, `low,high`.
    pub const BOUNDS: &str = "veil.bounds";
    /// Column: number of values of its public key set (domain).
    pub const DOMAIN_SIZE: &str = "veil.domain_size";
    /// Column: bucket width allowed for grouping.
    pub const BUCKET: &str = "veil.bucket_width";
}

/// One table an operator may query.
#[derive(Debug, Clone)]
pub struct ListedTable {
    /// Catalog name (always [`CATALOG`]).
    pub catalog: String,
    /// Schema (the agency part of the dataset id).
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Granted columns with their types and [`keys`] metadata; table-level
    /// metadata on the schema.
    pub columns: SchemaRef,
}

impl ListedTable {
    /// The dataset id, `schema.table`.
    pub fn dataset(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// What the grants expose of one dataset: grant ids, columns with their
/// uses, mandatory row filters.
type Exposure<'a> = (
    BTreeSet<&'a str>,
    BTreeMap<&'a str, BTreeSet<Use>>,
    Vec<&'a str>,
);

/// The tables the grants of `operator` in force at `now` expose, sorted by
/// dataset id. A column granted by several grants shows the union of its
/// uses; a column no grant names is not listed at all.
pub fn list(
    policy: &Policy,
    catalog: &Catalog,
    operator: &str,
    now: DateTime<FixedOffset>,
) -> Result<Vec<ListedTable>> {
    let mut by_dataset: BTreeMap<&str, Exposure> = BTreeMap::new();
    for grant in policy.grants_of(operator).filter(|g| g.in_force(now)) {
        for scope in &grant.scopes {
            let entry = by_dataset.entry(scope.dataset.as_str()).or_default();
            entry.0.insert(grant.id.as_str());
            for (column, uses) in &scope.columns {
                entry
                    .1
                    .entry(column.as_str())
                    .or_default()
                    .extend(uses.iter().copied());
            }
            if let Some(f) = &scope.row_filter {
                entry.2.push(f.as_str());
            }
        }
    }
    let mut out = Vec::new();
    for (id, (grants, columns, filters)) in by_dataset {
        let Some(dataset) = policy.datasets.get(id) else {
            continue;
        };
        let file = catalog.file_schema(id)?;
        let unit = dataset.unit.as_ref().map(|u| u.column.as_str());
        let mut fields = Vec::new();
        for field in file.fields() {
            let name = field.name().as_str();
            let granted = columns.get(name);
            if granted.is_none() && Some(name) != unit {
                continue;
            }
            let mut md = HashMap::new();
            if let Some(column) = dataset.column(name) {
                md.insert(keys::LEVEL.to_owned(), column.level.def().name.clone());
                let uses: Vec<&str> = granted
                    .into_iter()
                    .flatten()
                    .filter(|u| column.allow.contains(u))
                    .map(|u| u.as_str())
                    .collect();
                md.insert(keys::USES.to_owned(), uses.join(","));
                if let Some((lo, hi)) = column.bounds {
                    md.insert(keys::BOUNDS.to_owned(), format!("{lo},{hi}"));
                }
                let domain = match &column.domain {
                    Some(Domain::Values(v)) => Some(v.len()),
                    Some(Domain::Reference { dataset, column }) => catalog
                        .public_values(policy, dataset, column)
                        .ok()
                        .map(|v| v.len()),
                    None => None,
                };
                if let Some(n) = domain {
                    md.insert(keys::DOMAIN_SIZE.to_owned(), n.to_string());
                }
                if let Some(b) = column.bucket {
                    md.insert(keys::BUCKET.to_owned(), b.width.to_string());
                }
            } else {
                // The privacy unit, in scope for COUNT(DISTINCT unit) only.
                md.insert(keys::USES.to_owned(), String::new());
            }
            fields.push(Field::clone(field).with_metadata(md));
        }
        let mut md = HashMap::from([
            (keys::NAME.to_owned(), dataset.name.clone()),
            (keys::LEVEL.to_owned(), dataset.level.def().name.clone()),
            (keys::PUBLIC.to_owned(), dataset.is_public().to_string()),
            (
                keys::GRANTS.to_owned(),
                grants.into_iter().collect::<Vec<_>>().join(","),
            ),
        ]);
        if let Some(u) = unit {
            md.insert(keys::UNIT.to_owned(), u.to_owned());
        }
        if !filters.is_empty() {
            md.insert(keys::ROW_FILTER.to_owned(), filters.join(" AND "));
        }
        let (schema, table) = dataset.schema_table();
        out.push(ListedTable {
            catalog: CATALOG.to_owned(),
            schema: schema.to_owned(),
            table: table.to_owned(),
            columns: Arc::new(Schema::new_with_metadata(fields, md)),
        });
    }
    Ok(out)
}
