//! The validated, resolved policy: what the engine enforces.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, FixedOffset};
use sha2::{Digest, Sha256};

/// When a level lets values appear in output rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOutput {
    /// Never (only aggregates).
    Never,
    /// Only if the dataset's open attribute is not `none`.
    IfOpen,
    /// Always.
    Always,
}

/// Whether a level requires differential privacy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpRule {
    /// Always.
    Required,
    /// For commercial purposes.
    Commercial,
    /// At the data owner's choice.
    Optional,
    /// Never: the data is public.
    None,
}

/// One grading level (分级) and its ceilings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelDef {
    /// Name, e.g. `general_3`.
    pub name: String,
    /// Sensitivity rank; higher is more sensitive (就高从严 compares ranks).
    pub rank: u8,
    /// Whether data of this level may be loaded at all.
    pub admitted: bool,
    /// Uses a column of this level may ever be granted.
    pub ceiling: BTreeSet<Use>,
    /// When values may appear in output rows.
    pub row_output: RowOutput,
    /// Minimum group size in distinct units.
    pub min_group_size: u32,
    /// Whether DP is required.
    pub dp: DpRule,
    /// Purposes data of this level may be granted for.
    pub purposes: BTreeSet<Purpose>,
}

/// A grading level, as used by datasets and columns: compared by rank.
#[derive(Debug, Clone)]
pub struct Level(pub std::sync::Arc<LevelDef>);

impl Level {
    /// The level's definition.
    pub fn def(&self) -> &LevelDef {
        &self.0
    }

    /// Uses a column of this level may ever be granted.
    pub fn ceiling(&self) -> BTreeSet<Use> {
        self.0.ceiling.clone()
    }
}

impl PartialEq for Level {
    fn eq(&self, other: &Self) -> bool {
        self.0.rank == other.0.rank && self.0.name == other.0.name
    }
}

impl Eq for Level {}

impl PartialOrd for Level {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Level {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0.rank, &self.0.name).cmp(&(other.0.rank, &other.0.name))
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.name)
    }
}

/// A grading scheme: its levels, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GradingScheme {
    /// Name, e.g. `GB/T 43697-2024`.
    pub name: String,
    /// Levels, least sensitive first.
    pub levels: Vec<Level>,
}

/// Name of the built-in scheme.
pub const PRESET_SCHEME: &str = "GB/T 43697-2024";

/// (name, admitted, row output, min group, DP rule, purposes) of the preset,
/// least sensitive first: POLICY.md's default level table.
/// One row of the preset table.
type PresetRow = (
    &'static str,
    bool,
    RowOutput,
    u32,
    DpRule,
    &'static [Purpose],
);

const PRESET: [PresetRow; 6] = {
    use Purpose::*;
    const ALL: &[Purpose] = &[PublicGovernance, PublicWelfare, Commercial];
    [
        ("general_1", true, RowOutput::Always, 0, DpRule::None, ALL),
        (
            "general_2",
            true,
            RowOutput::IfOpen,
            5,
            DpRule::Optional,
            ALL,
        ),
        (
            "general_3",
            true,
            RowOutput::Never,
            10,
            DpRule::Commercial,
            ALL,
        ),
        (
            "general_4",
            true,
            RowOutput::Never,
            20,
            DpRule::Required,
            ALL,
        ),
        (
            "important",
            true,
            RowOutput::Never,
            50,
            DpRule::Required,
            &[PublicGovernance],
        ),
        ("core", false, RowOutput::Never, 0, DpRule::Required, &[]),
    ]
};

impl GradingScheme {
    /// The built-in GB/T 43697-2024 scheme.
    pub fn preset() -> GradingScheme {
        let levels = PRESET
            .iter()
            .enumerate()
            .map(
                |(rank, (name, admitted, row_output, min_group_size, dp, purposes))| {
                    Level(std::sync::Arc::new(LevelDef {
                        name: (*name).to_owned(),
                        rank: rank as u8,
                        admitted: *admitted,
                        ceiling: ceiling_for(*admitted, *row_output),
                        row_output: *row_output,
                        min_group_size: *min_group_size,
                        dp: *dp,
                        purposes: purposes.iter().copied().collect(),
                    }))
                },
            )
            .collect();
        GradingScheme {
            name: PRESET_SCHEME.to_owned(),
            levels,
        }
    }

    /// A level by name.
    pub fn level(&self, name: &str) -> Option<Level> {
        self.levels.iter().find(|l| l.0.name == name).cloned()
    }

    /// Level names, least sensitive first.
    pub fn names(&self) -> Vec<&str> {
        self.levels.iter().map(|l| l.0.name.as_str()).collect()
    }
}

/// The default ceiling of a level: every use but `project` unless rows may be output.
pub fn ceiling_for(admitted: bool, row_output: RowOutput) -> BTreeSet<Use> {
    use Use::*;
    if !admitted {
        return BTreeSet::new();
    }
    let mut c: BTreeSet<Use> = [GroupBy, Aggregate, Filter, FilterLiteral, Join].into();
    if row_output != RowOutput::Never {
        c.insert(Project);
    }
    c
}

/// Share or open attribute (共享/开放属性).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribute {
    /// 无条件 (unconditional).
    Unconditional,
    /// 有条件 (conditional).
    Conditional,
    /// 不予 (none).
    None,
}

impl Attribute {
    /// Parses `unconditional | conditional | none`.
    pub fn parse(s: &str) -> Option<Attribute> {
        Some(match s {
            "unconditional" => Attribute::Unconditional,
            "conditional" => Attribute::Conditional,
            "none" => Attribute::None,
            _ => return None,
        })
    }
}

/// How a query uses a column, derived from its plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Use {
    /// The value appears in output rows.
    Project,
    /// A released group key.
    GroupBy,
    /// Argument of an aggregate.
    Aggregate,
    /// Column-to-column predicate.
    Filter,
    /// Comparison with a literal or an IN-list.
    FilterLiteral,
    /// Equi-join key.
    Join,
}

impl Use {
    /// Parses the policy spelling.
    pub fn parse(s: &str) -> Option<Use> {
        Some(match s {
            "project" => Use::Project,
            "group_by" => Use::GroupBy,
            "aggregate" => Use::Aggregate,
            "filter" => Use::Filter,
            "filter_literal" => Use::FilterLiteral,
            "join" => Use::Join,
            _ => return None,
        })
    }

    /// The policy spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Use::Project => "project",
            Use::GroupBy => "group_by",
            Use::Aggregate => "aggregate",
            Use::Filter => "filter",
            Use::FilterLiteral => "filter_literal",
            Use::Join => "join",
        }
    }
}

impl fmt::Display for Use {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One value of a public key set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DomainValue {
    /// Integer key.
    Int(i64),
    /// Text key.
    Text(String),
}

impl fmt::Display for DomainValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainValue::Int(i) => write!(f, "{i}"),
            DomainValue::Text(s) => f.write_str(s),
        }
    }
}

/// A column of a dataset.
#[derive(Debug, Clone)]
pub struct Column {
    /// Name in the source.
    pub name: String,
    /// Grading level.
    pub level: Level,
    /// Tagged `identifier`: never aggregated, grouped or projected.
    pub identifier: bool,
    /// Uses the owner permits.
    pub allow: BTreeSet<Use>,
    /// Declared bounds for aggregation.
    pub bounds: Option<(f64, f64)>,
    /// Decimal digits kept in fixed-point sums.
    pub precision: u32,
    /// Public key set.
    pub domain: Option<Domain>,
    /// Bucketing allowed for grouping (e.g. 5-year age bands).
    pub bucket: Option<Bucket>,
}

impl Column {
    /// The column's public key set when it is listed in the policy.
    pub fn domain_values(&self) -> Option<&[DomainValue]> {
        match &self.domain {
            Some(Domain::Values(v)) => Some(v),
            _ => None,
        }
    }
}

/// A column's public key set.
#[derive(Debug, Clone, PartialEq)]
pub enum Domain {
    /// Listed in the policy.
    Values(Vec<DomainValue>),
    /// The values of a public dataset's column.
    Reference {
        /// Public dataset id.
        dataset: String,
        /// Column of that dataset.
        column: String,
    },
}

/// Bucketing of a numeric column for grouping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Bucket width, e.g. 5 for 5-year age bands.
    pub width: f64,
}

/// Storage format of a dataset's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// Apache Parquet.
    Parquet,
    /// CSV with a header row.
    Csv,
    /// Arrow IPC file.
    Arrow,
}

impl SourceFormat {
    /// Parses `parquet | csv | arrow`.
    pub fn parse(s: &str) -> Option<SourceFormat> {
        Some(match s {
            "parquet" => SourceFormat::Parquet,
            "csv" => SourceFormat::Csv,
            "arrow" => SourceFormat::Arrow,
            _ => return None,
        })
    }
}

/// A column that holds another dataset's privacy-unit id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignKey {
    /// Column of this dataset.
    pub column: String,
    /// Dataset whose unit it references.
    pub references: String,
}

/// A combination of datasets whose joint output is graded higher.
#[derive(Debug, Clone, PartialEq)]
pub struct Escalation {
    /// The datasets combined.
    pub datasets: BTreeSet<String>,
    /// The level of their joint output.
    pub level: Level,
    /// Why, as written.
    pub reason: Option<String>,
}

/// Two private datasets that may be joined on a key other than their privacy
/// unit (截断关联): before the join, each side keeps at most `max_matches`
/// rows per key value (and each unit at most its declared rows), so one
/// unit changes a bounded number of joined rows.
#[derive(Debug, Clone, PartialEq)]
pub struct TruncatedJoin {
    /// `(dataset, key column)` of each side.
    pub sides: [(String, String); 2],
    /// Rows of each side kept per key value.
    pub max_matches: u32,
    /// Why, as written.
    pub reason: Option<String>,
}

/// Daily hours in which a grant may be used (Beijing time, UTC+8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyHours {
    /// Minutes after midnight when use may start.
    pub from_minute: u16,
    /// Minutes after midnight when use must end.
    pub until_minute: u16,
}

impl DailyHours {
    /// Parses `HH:MM-HH:MM`.
    pub fn parse(s: &str) -> Option<DailyHours> {
        let (a, b) = s.split_once('-')?;
        let minute = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
        };
        let (from_minute, until_minute) = (minute(a)?, minute(b)?);
        (from_minute < until_minute).then_some(DailyHours {
            from_minute,
            until_minute,
        })
    }

    /// Whether a time of day (minutes after midnight, UTC+8) is inside.
    pub fn contains(&self, minute: u16) -> bool {
        self.from_minute <= minute && minute < self.until_minute
    }
}

/// Kind of protected entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitKind {
    /// A natural person (自然人).
    NaturalPerson,
    /// A legal person (法人).
    LegalPerson,
    /// A household (户).
    Household,
    /// Each row is its own unit.
    Row,
}

impl UnitKind {
    /// Parses the policy spelling.
    pub fn parse(s: &str) -> Option<UnitKind> {
        Some(match s {
            "natural_person" => UnitKind::NaturalPerson,
            "legal_person" => UnitKind::LegalPerson,
            "household" => UnitKind::Household,
            "row" => UnitKind::Row,
            _ => return None,
        })
    }

    /// The policy spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            UnitKind::NaturalPerson => "natural_person",
            UnitKind::LegalPerson => "legal_person",
            UnitKind::Household => "household",
            UnitKind::Row => "row",
        }
    }
}

/// The privacy unit of a private dataset.
#[derive(Debug, Clone)]
pub struct PrivacyUnit {
    /// Column identifying the unit.
    pub column: String,
    /// Kind of entity.
    pub kind: UnitKind,
    /// At most this many groups per unit.
    pub max_groups: u32,
    /// At most this many rows per unit and group.
    pub max_rows: u32,
}

/// A dataset of the catalog.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// `schema.table`.
    pub id: String,
    /// Human name.
    pub name: String,
    /// Owning agency.
    pub owner: String,
    /// Catalog code and version (目录编码).
    pub catalog: Option<(String, i64)>,
    /// 公共数据资源登记编号.
    pub registration_id: Option<String>,
    /// Level (at least the highest column level).
    pub level: Level,
    /// Share attribute.
    pub share: Attribute,
    /// Open attribute.
    pub open: Attribute,
    /// Path relative to the data directory.
    pub source_path: String,
    /// Storage format of the source.
    pub format: SourceFormat,
    /// Protected entity; `None` for public datasets.
    pub unit: Option<PrivacyUnit>,
    /// Columns referencing other datasets' units.
    pub foreign_keys: Vec<ForeignKey>,
    /// Columns.
    pub columns: Vec<Column>,
    /// The global budget of every query reading the dataset.
    pub budget: Option<DatasetBudget>,
}

/// A dataset's global privacy budget (全局隐私预算), over every operator.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetBudget {
    /// Unit, and δ for converting zCDP charges to ε.
    pub accounting: Accounting,
    /// The budget per window (or overall).
    pub total: f64,
    /// Refresh period in days, if any.
    pub window_days: Option<u32>,
}

impl Dataset {
    /// Public data (a level that needs no DP, e.g. general_1, and open
    /// unconditionally) is answered exactly.
    pub fn is_public(&self) -> bool {
        self.level.def().dp == DpRule::None && self.open == Attribute::Unconditional
    }

    /// Whether this dataset's privacy units and `other`'s are directly
    /// linked as one ID space: the same dataset, or units of the same kind
    /// under the same column name or joined by a foreign key from one unit
    /// column to the other dataset. [`Policy::share_units`] follows links.
    pub fn shares_units_with(&self, other: &Dataset) -> bool {
        let (Some(a), Some(b)) = (&self.unit, &other.unit) else {
            return false;
        };
        let linked = |x: &Dataset, unit: &str, y: &Dataset| {
            x.foreign_keys
                .iter()
                .any(|fk| fk.column == unit && fk.references == y.id)
        };
        self.id == other.id
            || (a.kind == b.kind
                && (a.column == b.column
                    || linked(self, &a.column, other)
                    || linked(other, &b.column, self)))
    }

    /// Looks a column up by name.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The `(schema, table)` halves of the id.
    pub fn schema_table(&self) -> (&str, &str) {
        self.id
            .split_once('.')
            .unwrap_or(("public", self.id.as_str()))
    }
}

/// An operator that may connect.
#[derive(Debug, Clone)]
pub struct Operator {
    /// Login id.
    pub id: String,
    /// Organisation.
    pub org: String,
    /// Subject of the operator's client certificate, for mTLS.
    pub mtls_subject: Option<String>,
    token_hashes: Vec<[u8; 32]>,
}

/// Channel of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// 共享: to government bodies.
    Sharing,
    /// 开放: to society.
    Opening,
    /// 授权运营: licensed operation.
    AuthorizedOperation,
}

impl Channel {
    /// Parses the policy spelling.
    pub fn parse(s: &str) -> Option<Channel> {
        Some(match s {
            "sharing" => Channel::Sharing,
            "opening" => Channel::Opening,
            "authorized_operation" => Channel::AuthorizedOperation,
            _ => return None,
        })
    }

    /// The policy spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Sharing => "sharing",
            Channel::Opening => "opening",
            Channel::AuthorizedOperation => "authorized_operation",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Channel::Sharing => "sharing (共享)",
            Channel::Opening => "opening (开放)",
            Channel::AuthorizedOperation => "authorized operation (授权运营)",
        })
    }
}

/// Purpose of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Purpose {
    /// 公共治理.
    PublicGovernance,
    /// 公益事业.
    PublicWelfare,
    /// 产业发展/行业发展 (commercial).
    Commercial,
}

impl Purpose {
    /// Parses the policy spelling.
    pub fn parse(s: &str) -> Option<Purpose> {
        Some(match s {
            "public_governance" => Purpose::PublicGovernance,
            "public_welfare" => Purpose::PublicWelfare,
            "commercial" => Purpose::Commercial,
            _ => return None,
        })
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Purpose::PublicGovernance => "public_governance",
            Purpose::PublicWelfare => "public_welfare",
            Purpose::Commercial => "commercial",
        })
    }
}

/// The unit a grant's budget is kept in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Accounting {
    /// Pure or approximate DP, basic composition; noise is discrete Laplace.
    Epsilon {
        /// δ of the grant (0 for pure DP).
        delta: f64,
    },
    /// Zero-concentrated DP; noise is discrete Gaussian.
    Rho {
        /// δ of the grant (0: no approximate-zCDP releases such as
        /// partition selection).
        delta: f64,
    },
}

impl Accounting {
    /// The grant's δ (0 when it has none).
    pub fn delta(&self) -> f64 {
        match *self {
            Accounting::Epsilon { delta } | Accounting::Rho { delta } => delta,
        }
    }
}

/// DP settings of a grant.
#[derive(Debug, Clone)]
pub struct DpSettings {
    /// Accounting unit.
    pub accounting: Accounting,
    /// Total budget.
    pub budget: f64,
    /// What one query costs.
    pub per_query: f64,
    /// Refresh window as written (ISO 8601, e.g. `P90D`).
    pub window: Option<String>,
    /// Groups a unit may contribute to, if the grant tightens the dataset's.
    pub max_groups: Option<u32>,
    /// Fold groups suppressed by partition selection into an `__other__` row.
    pub other_row: bool,
}

/// Pricing of a grant.
#[derive(Debug, Clone)]
pub enum Pricing {
    /// Free, possibly under conditions.
    Free {
        /// Conditions as written.
        conditions: Option<String>,
    },
    /// Government-guided price.
    GuidedPrice {
        /// Billing unit.
        unit: String,
        /// Price in CNY.
        price_cny: f64,
        /// Published cap in CNY.
        cap_cny: f64,
    },
}

/// What a grant exposes of one dataset.
#[derive(Debug, Clone)]
pub struct Scope {
    /// Dataset id.
    pub dataset: String,
    /// Mandatory row filter.
    pub row_filter: Option<String>,
    /// Granted uses per column.
    pub columns: BTreeMap<String, BTreeSet<Use>>,
}

/// A grant to one operator.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Grant id.
    pub id: String,
    /// Channel.
    pub channel: Channel,
    /// Operator id.
    pub grantee: String,
    /// Implementing agency (实施机构).
    pub agency: Option<String>,
    /// Agreement number (授权协议编号).
    pub agreement: Option<String>,
    /// Purpose.
    pub purpose: Purpose,
    /// Purpose as written.
    pub purpose_detail: Option<String>,
    /// Data products the grant is for.
    pub products: Vec<String>,
    /// Start of validity.
    pub valid_from: DateTime<FixedOffset>,
    /// End of validity.
    pub valid_until: DateTime<FixedOffset>,
    /// Daily hours of use, if restricted.
    pub hours: Option<DailyHours>,
    /// Datasets in scope.
    pub scopes: Vec<Scope>,
    /// Allowed aggregate functions (upper case).
    pub agg_functions: BTreeSet<String>,
    /// Minimum group size in distinct units.
    pub min_group_size: u32,
    /// Query cap per day.
    pub max_queries_per_day: Option<u32>,
    /// Result row cap.
    pub max_result_rows: u32,
    /// DP settings; required for private datasets.
    pub dp: Option<DpSettings>,
    /// Pricing.
    pub pricing: Pricing,
    /// Whether the audit log keeps the text of the grant's queries (their
    /// hash is always kept).
    pub audit_query_text: bool,
}

impl Grant {
    /// The scope for a dataset, if the grant covers it.
    pub fn scope(&self, dataset: &str) -> Option<&Scope> {
        self.scopes.iter().find(|s| s.dataset == dataset)
    }

    /// Whether the grant is in force at `now`.
    pub fn in_force(&self, now: DateTime<FixedOffset>) -> bool {
        self.valid_from <= now && now <= self.valid_until
    }
}

/// Why no grant applies to a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrantRefusal {
    /// The operator has no grant at all covering the datasets.
    #[error(
        "operator `{operator}` has no grant covering dataset `{dataset}`; ask the data owner for a grant that includes it"
    )]
    NoGrant {
        /// Operator id.
        operator: String,
        /// First uncovered dataset.
        dataset: String,
    },
    /// The only covering grant has expired.
    #[error(
        "grant `{grant}` expired at {until}; the operator must apply for a renewal (续期) before querying again"
    )]
    Expired {
        /// Grant id.
        grant: String,
        /// End of validity.
        until: String,
    },
    /// The only covering grant is not yet in force.
    #[error("grant `{grant}` is not in force until {from}")]
    NotYetValid {
        /// Grant id.
        grant: String,
        /// Start of validity.
        from: String,
    },
    /// The datasets read together are graded higher (an escalation), and the
    /// grant's purpose is not allowed at that level.
    #[error(
        "reading {datasets} together is graded `{level}`{reason}, which grant `{grant}` (purpose {purpose}) may not use; query them separately or ask for a grant whose purpose the level allows"
    )]
    Escalated {
        /// Grant id.
        grant: String,
        /// The combined datasets, listed.
        datasets: String,
        /// The escalated level.
        level: String,
        /// The grant's purpose.
        purpose: String,
        /// `: <reason>` when the policy gives one.
        reason: String,
    },
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Policy id.
    pub id: String,
    /// Policy version.
    pub version: String,
    /// The grading scheme in force.
    pub scheme: GradingScheme,
    /// SHA-256 of the canonical form, hex.
    pub hash: String,
    /// Datasets by id.
    pub datasets: BTreeMap<String, Dataset>,
    /// Operators by id.
    pub operators: BTreeMap<String, Operator>,
    /// Grants in file order.
    pub grants: Vec<Grant>,
    /// Combinations of datasets graded higher.
    pub escalations: Vec<Escalation>,
    /// Joins of private datasets on other keys than the unit.
    pub truncated_joins: Vec<TruncatedJoin>,
}

/// Hashes a bearer token the way policies store it (`sha256:<hex>`).
pub fn token_hash(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

impl Operator {
    pub(crate) fn new(
        id: String,
        org: String,
        token_hashes: Vec<[u8; 32]>,
        mtls_subject: Option<String>,
    ) -> Self {
        Operator {
            id,
            org,
            mtls_subject,
            token_hashes,
        }
    }

    /// Whether `token` is one of this operator's credentials.
    pub fn accepts(&self, token: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare every stored hash without early exit on a match position.
        let mut found = false;
        for h in &self.token_hashes {
            let mut diff = 0u8;
            for (a, b) in h.iter().zip(digest.iter()) {
                diff |= a ^ b;
            }
            found |= diff == 0;
        }
        found
    }
}

/// A subject as the policy writes it (`CN=op-credit-01, O=Bank`): its
/// attributes in order, as (short name, value) pairs. Values cannot contain
/// `,` or `=`; a certificate whose values do can therefore never match.
pub fn subject_attributes(subject: &str) -> Vec<(String, String)> {
    subject
        .split(',')
        .filter_map(|rdn| {
            let (name, value) = rdn.split_once('=')?;
            Some((name.trim().to_ascii_uppercase(), value.trim().to_owned()))
        })
        .collect()
}

impl Policy {
    /// The operator whose `mtls = { subject = … }` has exactly these
    /// attributes, in this order (a client certificate's subject, attribute
    /// by attribute: never compared as text, so a value holding `, O=…`
    /// cannot pose as two attributes).
    pub fn operator_by_subject(&self, attributes: &[(String, String)]) -> Option<&Operator> {
        self.operators.values().find(|op| {
            op.mtls_subject
                .as_deref()
                .is_some_and(|s| subject_attributes(s) == attributes)
        })
    }

    /// Finds the operator a token belongs to; `operator_id` narrows the search when known.
    pub fn authenticate(&self, operator_id: Option<&str>, token: &str) -> Option<&Operator> {
        match operator_id {
            Some(id) => self.operators.get(id).filter(|op| op.accepts(token)),
            None => self.operators.values().find(|op| op.accepts(token)),
        }
    }

    /// The grant under which `operator` may query all of `datasets` at `now`.
    pub fn grant_for(
        &self,
        operator: &str,
        datasets: &[&str],
        now: DateTime<FixedOffset>,
    ) -> Result<&Grant, GrantRefusal> {
        let covering: Vec<&Grant> = self
            .grants
            .iter()
            .filter(|g| g.grantee == operator)
            .filter(|g| datasets.iter().all(|d| g.scope(d).is_some()))
            .collect();
        if let Some(g) = covering.iter().find(|g| g.in_force(now)) {
            // 就高从严: a combination graded higher binds the grant too.
            for e in self.escalations_for(datasets) {
                let def = e.level.def();
                if !def.admitted || !def.purposes.contains(&g.purpose) {
                    return Err(GrantRefusal::Escalated {
                        grant: g.id.clone(),
                        datasets: e
                            .datasets
                            .iter()
                            .map(|d| format!("`{d}`"))
                            .collect::<Vec<_>>()
                            .join(" and "),
                        level: def.name.clone(),
                        purpose: g.purpose.to_string(),
                        reason: e
                            .reason
                            .as_ref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default(),
                    });
                }
            }
            return Ok(g);
        }
        match covering.first() {
            Some(g) if now > g.valid_until => Err(GrantRefusal::Expired {
                grant: g.id.clone(),
                until: g.valid_until.to_rfc3339(),
            }),
            Some(g) => Err(GrantRefusal::NotYetValid {
                grant: g.id.clone(),
                from: g.valid_from.to_rfc3339(),
            }),
            None => {
                let uncovered = datasets
                    .iter()
                    .find(|d| {
                        !self
                            .grants
                            .iter()
                            .any(|g| g.grantee == operator && g.scope(d).is_some())
                    })
                    .or(datasets.first())
                    .map(|d| d.to_string())
                    .unwrap_or_default();
                Err(GrantRefusal::NoGrant {
                    operator: operator.to_owned(),
                    dataset: uncovered,
                })
            }
        }
    }

    /// The minimum group size a grant's queries must respect: the largest of
    /// the grant's own and the levels' of every dataset in its scope.
    pub fn min_group_size(&self, grant: &Grant) -> u32 {
        grant
            .scopes
            .iter()
            .filter_map(|s| self.datasets.get(&s.dataset))
            .map(|d| d.level.def().min_group_size)
            .fold(grant.min_group_size, u32::max)
    }

    /// The escalations that apply when `datasets` are read together: those
    /// whose every dataset is among them.
    pub fn escalations_for<'a>(
        &'a self,
        datasets: &'a [&str],
    ) -> impl Iterator<Item = &'a Escalation> + 'a {
        self.escalations
            .iter()
            .filter(move |e| e.datasets.iter().all(|d| datasets.contains(&d.as_str())))
    }

    /// The minimum group size of a query reading `datasets` under `grant`:
    /// [`Self::min_group_size`], raised by the levels of the escalations
    /// that apply.
    pub fn query_min_group_size(&self, grant: &Grant, datasets: &[&str]) -> u32 {
        self.escalations_for(datasets)
            .map(|e| e.level.def().min_group_size)
            .fold(self.min_group_size(grant), u32::max)
    }

    /// The truncated join declared for the equality `a = b` of two
    /// `(dataset, column)` pairs, in either order.
    pub fn truncated_join(&self, a: (&str, &str), b: (&str, &str)) -> Option<&TruncatedJoin> {
        self.truncated_joins.iter().find(|t| {
            let [(xd, xc), (yd, yc)] = &t.sides;
            let (x, y) = ((xd.as_str(), xc.as_str()), (yd.as_str(), yc.as_str()));
            (x, y) == (a, b) || (x, y) == (b, a)
        })
    }

    /// Whether two datasets' privacy units are one ID space, directly or
    /// through a chain of linked datasets (visits → residents ← insurance).
    pub fn share_units(&self, a: &str, b: &str) -> bool {
        let mut seen = vec![a];
        let mut i = 0;
        while i < seen.len() {
            if seen[i] == b {
                return true;
            }
            let Some(x) = self.datasets.get(seen[i]) else {
                return false;
            };
            for y in self.datasets.values() {
                if !seen.contains(&y.id.as_str()) && x.shares_units_with(y) {
                    seen.push(&y.id);
                }
            }
            i += 1;
        }
        false
    }

    /// Grants held by one operator.
    pub fn grants_of<'a>(&'a self, operator: &'a str) -> impl Iterator<Item = &'a Grant> + 'a {
        self.grants.iter().filter(move |g| g.grantee == operator)
    }
}
