//! `RawPolicy`: exactly what serde read from the TOML file, before any check.
//!
//! Every table denies unknown keys, so a misspelt key is an error rather than a
//! silently ignored permission.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A policy file as written by the security officer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// `[policy]`: identity of the file.
    pub policy: RawHeader,
    /// `[[level]]`: the levels of a custom grading scheme (none for the preset).
    #[serde(default, rename = "level", skip_serializing_if = "Vec::is_empty")]
    pub levels: Vec<RawLevel>,
    /// `[[dataset]]`: the catalog.
    #[serde(default, rename = "dataset")]
    pub datasets: Vec<RawDataset>,
    /// `[[operator]]`: who may connect.
    #[serde(default, rename = "operator")]
    pub operators: Vec<RawOperator>,
    /// `[[grant]]`: what each operator may do.
    #[serde(default, rename = "grant")]
    pub grants: Vec<RawGrant>,
    /// `[[escalation]]`: combinations of datasets whose joint output is graded higher.
    #[serde(default, rename = "escalation", skip_serializing_if = "Vec::is_empty")]
    pub escalations: Vec<RawEscalation>,
    /// `[[truncated_join]]`: private datasets that may be joined on a key
    /// other than their privacy unit, each side truncated per key value.
    #[serde(
        default,
        rename = "truncated_join",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub truncated_joins: Vec<RawTruncatedJoin>,
}

/// `[[truncated_join]]` (截断关联).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTruncatedJoin {
    /// The two private datasets (the same one twice for a self-join).
    pub datasets: Vec<String>,
    /// The key column of each dataset, in the same order.
    pub on: Vec<String>,
    /// Rows of each side kept per key value (截断阈值).
    pub max_matches: u32,
    /// Why the join is needed.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `[[escalation]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEscalation {
    /// Dataset ids combined (two or more).
    pub datasets: Vec<String>,
    /// Level of their joint output, e.g. `important`.
    pub level: String,
    /// Why the combination is more sensitive.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `[policy]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawHeader {
    /// Policy identifier, e.g. `bj-public-data`.
    pub id: String,
    /// Officer-chosen version string.
    pub version: String,
    /// Grading scheme; only `GB/T 43697-2024` is built in.
    #[serde(default = "default_scheme")]
    pub grading_scheme: String,
}

/// `[[level]]`: one level of a custom grading scheme.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLevel {
    /// Level name, used by datasets and columns.
    pub name: String,
    /// Sensitivity rank: higher is more sensitive.
    pub rank: u8,
    /// Whether data of this level may be loaded at all (default true).
    #[serde(default = "yes")]
    pub admitted: bool,
    /// Uses a column of this level may ever be granted (default: all that
    /// `row_output` permits).
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// `never`, `if_open` or `always`: when values may appear in output rows.
    pub row_output: String,
    /// Minimum group size in distinct units.
    #[serde(default)]
    pub min_group_size: u32,
    /// `required`, `commercial`, `optional` or `none`: when DP is required.
    pub dp: String,
    /// Purposes data of this level may be granted for.
    pub purposes: Vec<String>,
}

fn yes() -> bool {
    true
}

fn default_scheme() -> String {
    "GB/T 43697-2024".to_owned()
}

/// `[[dataset]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDataset {
    /// `schema.table`.
    pub id: String,
    /// Human name (often Chinese).
    pub name: String,
    /// Owning agency.
    pub owner: String,
    /// Catalog entry (目录编码).
    #[serde(default)]
    pub catalog: Option<RawCatalog>,
    /// 公共数据资源登记编号.
    #[serde(default)]
    pub registration_id: Option<String>,
    /// Grading level.
    pub level: String,
    /// Share attribute (共享属性).
    pub share: String,
    /// Open attribute (开放属性).
    pub open: String,
    /// Where the data lives, relative to the data directory.
    pub source: RawSource,
    /// The protected entity; required unless the dataset is public.
    #[serde(default)]
    pub privacy_unit: Option<RawPrivacyUnit>,
    /// Columns that hold another dataset's privacy-unit id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign_keys: Vec<RawForeignKey>,
    /// `[[dataset.column]]`.
    #[serde(default, rename = "column")]
    pub columns: Vec<RawColumn>,
    /// The dataset's global privacy budget over every operator and grant.
    #[serde(default)]
    pub budget: Option<RawDatasetBudget>,
}

/// A dataset's global privacy budget (全局隐私预算): every query that reads
/// the dataset draws on it, whoever runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDatasetBudget {
    /// `epsilon` or `rho`: the unit of `total`.
    pub accounting: String,
    /// The budget per window (or overall).
    pub total: f64,
    /// For `epsilon`: the δ at which zCDP charges are converted to ε.
    #[serde(default)]
    pub delta: Option<f64>,
    /// Refresh window (ISO 8601 duration in days or weeks).
    #[serde(default)]
    pub window: Option<String>,
}

/// Catalog code and version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCatalog {
    /// Catalog code.
    pub code: String,
    /// Catalog version.
    pub version: i64,
}

/// Data source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// Path relative to the data directory.
    pub path: String,
    /// File format; `parquet` by default.
    #[serde(default)]
    pub format: Option<String>,
}

/// A foreign key to another dataset's privacy unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawForeignKey {
    /// Column of this dataset.
    pub column: String,
    /// Id of the dataset whose unit it references.
    pub references: String,
}

/// Privacy unit declaration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPrivacyUnit {
    /// Column identifying the unit.
    pub column: String,
    /// `natural_person`, `legal_person`, `household` or `row`.
    pub kind: String,
    /// At most this many groups per unit (L0 bound).
    pub max_groups: u32,
    /// At most this many rows per unit and group (L∞ bound).
    pub max_rows: u32,
}

/// `[[dataset.column]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawColumn {
    /// Column name in the source.
    pub name: String,
    /// Grading level of the column.
    pub level: String,
    /// Tags such as `identifier`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Uses the owning agency permits.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Declared value bounds `[lo, hi]` for aggregation.
    #[serde(default)]
    pub bounds: Option<[f64; 2]>,
    /// Decimal digits kept when summing in fixed point.
    #[serde(default)]
    pub precision: Option<u32>,
    /// Public key set of the column: a list of values, or
    /// `{ dataset = "geo.districts", column = "name" }`.
    #[serde(default)]
    pub domain: Option<RawDomain>,
    /// Bucketing allowed for grouping, e.g. `{ width = 5 }` for 5-year bands.
    #[serde(default)]
    pub bucket: Option<RawBucket>,
}

/// A public key set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RawDomain {
    /// Listed values.
    Values(Vec<RawDomainValue>),
    /// The values of a public dataset's column.
    Reference {
        /// Public dataset id.
        dataset: String,
        /// Column of that dataset.
        column: String,
    },
}

/// Bucketing of a numeric column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawBucket {
    /// Bucket width.
    pub width: f64,
}

/// One value of a declared public domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RawDomainValue {
    /// An integer key.
    Int(i64),
    /// A text key.
    Text(String),
}

/// `[[operator]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawOperator {
    /// Operator id, used as the login name.
    pub id: String,
    /// Organisation.
    pub org: String,
    /// Unified social credit code of the organisation.
    #[serde(default)]
    pub uscc: Option<String>,
    /// `sha256:<hex>` hashes of accepted tokens.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Client-certificate identity for mutual TLS.
    #[serde(default)]
    pub mtls: Option<RawMtls>,
}

/// `mtls = { subject = "CN=op-credit-01" }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawMtls {
    /// Subject distinguished name of the client certificate.
    pub subject: String,
}

/// `[[grant]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawGrant {
    /// Grant id.
    pub id: String,
    /// `sharing`, `opening` or `authorized_operation`.
    pub channel: String,
    /// Operator id.
    pub grantee: String,
    /// Implementing agency.
    #[serde(default)]
    pub agency: Option<String>,
    /// Agreement number.
    #[serde(default)]
    pub agreement: Option<String>,
    /// `public_governance`, `public_welfare` or `commercial`.
    pub purpose: String,
    /// Free-text purpose.
    #[serde(default)]
    pub purpose_detail: Option<String>,
    /// Data products (数据产品) the grant is for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub products: Vec<String>,
    /// Start of validity, e.g. 2026-01-01T00:00:00+08:00.
    #[schemars(with = "String")]
    pub valid_from: toml::value::Datetime,
    /// End of validity.
    #[schemars(with = "String")]
    pub valid_until: toml::value::Datetime,
    /// Daily hours of use, `HH:MM-HH:MM` (Beijing time).
    #[serde(default)]
    pub hours: Option<String>,
    /// `[[grant.scope]]`.
    #[serde(default, rename = "scope")]
    pub scopes: Vec<RawScope>,
    /// `[grant.limits]`.
    #[serde(default)]
    pub limits: Option<RawLimits>,
    /// `[grant.dp]`.
    #[serde(default)]
    pub dp: Option<RawDp>,
    /// `[grant.pricing]`.
    #[serde(default)]
    pub pricing: Option<RawPricing>,
    /// Whether the audit log keeps the text of this grant's queries
    /// (default true); their hash is always kept.
    #[serde(default)]
    pub audit_query_text: Option<bool>,
}

/// `[[grant.scope]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawScope {
    /// Dataset id.
    pub dataset: String,
    /// Mandatory row filter (SQL predicate).
    #[serde(default)]
    pub row_filter: Option<String>,
    /// Column → uses.
    #[serde(default)]
    pub columns: std::collections::BTreeMap<String, Vec<String>>,
}

/// `[grant.limits]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Allowed aggregate functions (upper case).
    #[serde(default)]
    pub agg_functions: Option<Vec<String>>,
    /// Minimum group size in distinct units.
    #[serde(default)]
    pub min_group_size: Option<u32>,
    /// Query cap per day.
    #[serde(default)]
    pub max_queries_per_day: Option<u32>,
    /// Result row cap.
    #[serde(default)]
    pub max_result_rows: Option<u32>,
}

/// `[grant.dp]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDp {
    /// `epsilon` or `rho`.
    pub accounting: String,
    /// Total budget in the accounting unit.
    pub budget: f64,
    /// What one query costs at most (and by default).
    pub per_query_max: f64,
    /// δ for ε-accounting.
    #[serde(default)]
    pub delta: Option<f64>,
    /// Refresh window (ISO 8601 duration).
    #[serde(default)]
    pub window: Option<String>,
    /// Groups a unit may contribute to, tightening the dataset's max_groups.
    #[serde(default)]
    pub max_groups: Option<u32>,
    /// Under partition selection, fold the suppressed groups into one noisy
    /// `__other__` row (合并未发布组), so that totals add up. Needs epsilon
    /// accounting.
    #[serde(default)]
    pub other_row: Option<bool>,
}

/// `[grant.pricing]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPricing {
    /// `free` or `guided_price`.
    pub model: String,
    /// Billing unit, e.g. `per_query`.
    #[serde(default)]
    pub unit: Option<String>,
    /// Price in CNY.
    #[serde(default)]
    pub price_cny: Option<f64>,
    /// Published cap in CNY.
    #[serde(default)]
    pub cap_cny: Option<f64>,
    /// Conditions for free use.
    #[serde(default)]
    pub conditions: Option<String>,
}
