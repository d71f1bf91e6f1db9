//! `RawPolicy` → `Policy`: resolves names and checks every loading rule of
//! POLICY.md, collecting all problems (each at its place in the file) instead
//! of stopping at the first.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, FixedOffset};

use crate::diagnostic::{Diagnostic, TomlPath, suggest};
use crate::model::*;
use crate::path;
use crate::raw::*;

struct Checker {
    problems: Vec<Diagnostic>,
    scheme: GradingScheme,
}

impl Checker {
    /// A level of the scheme in force, suggesting the closest name on a typo.
    fn level(&mut self, at: TomlPath, value: &str) -> Option<Level> {
        let found = self.scheme.level(value);
        if found.is_none() {
            let names = self.scheme.names().join(", ");
            let help = match suggest(value, self.scheme.names()) {
                Some(s) => format!(
                    "did you mean `{s}`? (levels of {}: {names})",
                    self.scheme.name
                ),
                None => format!("levels of {}: {names}", self.scheme.name),
            };
            self.err(at, format!("unknown level `{value}`")).help = Some(help);
        }
        found
    }

    fn err(&mut self, at: TomlPath, message: impl Into<String>) -> &mut Diagnostic {
        self.problems.push(Diagnostic::new(at, message));
        let last = self.problems.len() - 1;
        &mut self.problems[last]
    }

    /// Parses one of a fixed set of words, suggesting the closest on a typo.
    fn word<T>(
        &mut self,
        at: TomlPath,
        what: &str,
        value: &str,
        allowed: &[&str],
        f: fn(&str) -> Option<T>,
    ) -> Option<T> {
        let parsed = f(value);
        if parsed.is_none() {
            let d = self.err(at, format!("unknown {what} `{value}`"));
            d.help = Some(match suggest(value, allowed.iter().copied()) {
                Some(s) => format!(
                    "did you mean `{s}`? ({what} is one of {})",
                    allowed.join(", ")
                ),
                None => format!("{what} is one of {}", allowed.join(", ")),
            });
        }
        parsed
    }
}

const ATTRS: &[&str] = &["unconditional", "conditional", "none"];
const USES: &[&str] = &[
    "project",
    "group_by",
    "aggregate",
    "filter",
    "filter_literal",
    "join",
];
const CHANNELS: &[&str] = &["sharing", "opening", "authorized_operation"];
const PURPOSES: &[&str] = &["public_governance", "public_welfare", "commercial"];
const UNIT_KINDS: &[&str] = &["natural_person", "legal_person", "household", "row"];
/// Aggregate functions a grant's `agg_functions` may name.
pub const AGGREGATES: &[&str] = &[
    "COUNT",
    "SUM",
    "AVG",
    "VAR_POP",
    "STDDEV_POP",
    "MEDIAN",
    "PERCENTILE_CONT",
    "APPROX_PERCENTILE_CONT",
    "MIN",
    "MAX",
];

/// Validates and resolves a raw policy. The hash is filled in by the caller.
pub(crate) fn resolve(raw: &RawPolicy) -> Result<Policy, Vec<Diagnostic>> {
    let mut c = Checker {
        problems: Vec::new(),
        scheme: GradingScheme::preset(),
    };
    c.scheme = resolve_scheme(&mut c, raw);
    let mut datasets = BTreeMap::new();
    for (i, d) in raw.datasets.iter().enumerate() {
        let at = path!("dataset", i);
        if let Some(ds) = resolve_dataset(&mut c, &at, d) {
            if datasets.contains_key(&ds.id) {
                c.err(at.at("id"), format!("dataset `{}` is declared twice", d.id))
                    .help = Some("dataset ids are unique; the first declaration is kept".into());
            } else {
                datasets.insert(ds.id.clone(), ds);
            }
        }
    }
    let mut operators = BTreeMap::new();
    for (i, o) in raw.operators.iter().enumerate() {
        let at = path!("operator", i);
        let mut hashes = Vec::new();
        for (j, t) in o.tokens.iter().enumerate() {
            match t
                .strip_prefix("sha256:")
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
            {
                Some(h) => hashes.push(h),
                None => {
                    c.err(at.at("tokens").at(j), "a token must be stored as `sha256:` and 64 hex digits")
                        .help = Some("store the hash of the token, never the token itself: `printf %s TOKEN | sha256sum`".into());
                }
            }
        }
        if let Some(m) = &o.mtls
            && let Some(other) = operators.values().find(|op: &&Operator| {
                op.mtls_subject.as_deref().is_some_and(|s| {
                    crate::model::subject_attributes(s)
                        == crate::model::subject_attributes(&m.subject)
                })
            })
        {
            c.err(
                at.at("mtls").at("subject"),
                format!(
                    "operator `{}` already has the certificate subject `{}`: a certificate must name one operator",
                    other.id, m.subject
                ),
            );
        }
        if operators
            .insert(
                o.id.clone(),
                Operator::new(
                    o.id.clone(),
                    o.org.clone(),
                    hashes,
                    o.mtls.as_ref().map(|m| m.subject.clone()),
                ),
            )
            .is_some()
        {
            c.err(
                at.at("id"),
                format!("operator `{}` is declared twice", o.id),
            );
        }
    }
    let mut grants = Vec::new();
    for (i, g) in raw.grants.iter().enumerate() {
        if let Some(grant) = resolve_grant(&mut c, &path!("grant", i), g, &datasets, &operators) {
            grants.push((i, grant));
        }
    }
    let mut ids = BTreeMap::new();
    for (i, g) in &grants {
        if let Some(first) = ids.insert(g.id.clone(), *i) {
            c.err(
                path!("grant", *i, "id"),
                format!(
                    "grant `{}` is declared twice (first as grant #{})",
                    g.id,
                    first + 1
                ),
            );
        }
    }
    check_overlaps(&mut c, &grants);
    check_budget_units(&mut c, &grants, &datasets);
    let escalations = resolve_escalations(&mut c, raw, &datasets);
    let truncated_joins = resolve_truncated_joins(&mut c, raw, &datasets);
    if !c.problems.is_empty() {
        return Err(c.problems);
    }
    Ok(Policy {
        id: raw.policy.id.clone(),
        version: raw.policy.version.clone(),
        scheme: c.scheme,
        hash: String::new(),
        datasets,
        operators,
        grants: grants.into_iter().map(|(_, g)| g).collect(),
        escalations,
        truncated_joins,
    })
}

/// The grading scheme: the built-in preset, or the `[[level]]` tables.
fn resolve_scheme(c: &mut Checker, raw: &RawPolicy) -> GradingScheme {
    let name = raw.policy.grading_scheme.clone();
    if raw.levels.is_empty() {
        if name != PRESET_SCHEME {
            c.err(
                path!("policy", "grading_scheme"),
                format!("unknown grading scheme `{name}`"),
            )
            .help = Some(format!(
                "use the built-in `{PRESET_SCHEME}`, or declare this scheme's levels in [[level]] tables"
            ));
        }
        return GradingScheme::preset();
    }
    if name == PRESET_SCHEME {
        c.err(
            path!("policy", "grading_scheme"),
            format!("`{PRESET_SCHEME}` is built in and cannot be redefined by [[level]] tables"),
        )
        .help = Some("give your scheme its own name, e.g. grading_scheme = \"health-5\"".into());
        return GradingScheme::preset();
    }
    let mut levels: Vec<Level> = Vec::new();
    for (i, l) in raw.levels.iter().enumerate() {
        let at = path!("level", i);
        if levels.iter().any(|x| x.def().name == l.name) {
            c.err(
                at.at("name"),
                format!("level `{}` is declared twice", l.name),
            );
            continue;
        }
        if levels.iter().any(|x| x.def().rank == l.rank) {
            c.err(
                at.at("rank"),
                format!(
                    "two levels have rank {}; ranks order levels and must differ",
                    l.rank
                ),
            );
        }
        let row_output = c.word(
            at.at("row_output"),
            "row output",
            &l.row_output,
            &["never", "if_open", "always"],
            |s| {
                Some(match s {
                    "never" => RowOutput::Never,
                    "if_open" => RowOutput::IfOpen,
                    "always" => RowOutput::Always,
                    _ => return None,
                })
            },
        );
        let dp = c.word(
            at.at("dp"),
            "DP rule",
            &l.dp,
            &["required", "commercial", "optional", "none"],
            |s| {
                Some(match s {
                    "required" => DpRule::Required,
                    "commercial" => DpRule::Commercial,
                    "optional" => DpRule::Optional,
                    "none" => DpRule::None,
                    _ => return None,
                })
            },
        );
        let mut purposes = BTreeSet::new();
        for (k, p) in l.purposes.iter().enumerate() {
            if let Some(p) = c.word(
                at.at("purposes").at(k),
                "purpose",
                p,
                PURPOSES,
                Purpose::parse,
            ) {
                purposes.insert(p);
            }
        }
        let row_output = row_output.unwrap_or(RowOutput::Never);
        let ceiling = match &l.allow {
            None => ceiling_for(l.admitted, row_output),
            Some(uses) => {
                let mut set = BTreeSet::new();
                for (k, u) in uses.iter().enumerate() {
                    if let Some(u) = c.word(at.at("allow").at(k), "use", u, USES, Use::parse) {
                        set.insert(u);
                    }
                }
                if set.contains(&Use::Project) && row_output == RowOutput::Never {
                    c.err(
                        at.at("allow"),
                        "`project` contradicts row_output = \"never\"",
                    );
                }
                set
            }
        };
        levels.push(Level(std::sync::Arc::new(LevelDef {
            name: l.name.clone(),
            rank: l.rank,
            admitted: l.admitted,
            ceiling,
            row_output,
            min_group_size: l.min_group_size,
            dp: dp.unwrap_or(DpRule::Required),
            purposes,
        })));
    }
    levels.sort();
    GradingScheme { name, levels }
}

/// Stand-in for a level that could not be read: reported already, so it
/// permits everything and compares with nothing, to avoid follow-on errors.
fn unknown_level() -> Level {
    Level(std::sync::Arc::new(LevelDef {
        name: "<unknown>".into(),
        rank: u8::MAX,
        admitted: true,
        ceiling: [
            Use::Project,
            Use::GroupBy,
            Use::Aggregate,
            Use::Filter,
            Use::FilterLiteral,
            Use::Join,
        ]
        .into(),
        row_output: RowOutput::Always,
        min_group_size: 0,
        dp: DpRule::Required,
        purposes: [
            Purpose::PublicGovernance,
            Purpose::PublicWelfare,
            Purpose::Commercial,
        ]
        .into(),
    }))
}

/// Two grants for the same operator and dataset in force at the same time
/// would make the applicable purpose, budget and price ambiguous.
fn check_overlaps(c: &mut Checker, grants: &[(usize, Grant)]) {
    for (a, (_, ga)) in grants.iter().enumerate() {
        for (ib, gb) in grants.iter().skip(a + 1) {
            if ga.grantee != gb.grantee
                || ga.valid_until < gb.valid_from
                || gb.valid_until < ga.valid_from
            {
                continue;
            }
            if let Some(shared) = ga.scopes.iter().find(|s| gb.scope(&s.dataset).is_some()) {
                c.err(
                    path!("grant", *ib, "valid_from"),
                    format!(
                        "grant `{}` overlaps grant `{}`: both give `{}` access to `{}` at the same time",
                        gb.id, ga.id, ga.grantee, shared.dataset
                    ),
                )
                .help = Some("end one grant before the other begins, or merge them into one grant".into());
            }
        }
    }
}

/// A zCDP grant can draw on a dataset's ε budget only through a conversion
/// at a δ the budget declares.
fn check_budget_units(
    c: &mut Checker,
    grants: &[(usize, Grant)],
    datasets: &BTreeMap<String, Dataset>,
) {
    for (i, g) in grants {
        let Some(Accounting::Rho { .. }) = g.dp.as_ref().map(|d| d.accounting) else {
            continue;
        };
        for s in &g.scopes {
            if let Some(DatasetBudget {
                accounting: Accounting::Epsilon { delta },
                ..
            }) = datasets.get(&s.dataset).and_then(|d| d.budget.as_ref())
                && *delta <= 0.0
            {
                c.err(
                    path!("grant", *i, "dp", "accounting"),
                    format!(
                        "grant `{}` is accounted in rho, but the budget of `{}` is in epsilon without delta; a zCDP charge converts to ε only at some δ > 0",
                        g.id, s.dataset
                    ),
                )
                .help = Some(format!(
                    "add `delta` (e.g. 1e-7) to the budget of `{}`, or account it in rho",
                    s.dataset
                ));
            }
        }
    }
}

fn resolve_escalations(
    c: &mut Checker,
    raw: &RawPolicy,
    datasets: &BTreeMap<String, Dataset>,
) -> Vec<Escalation> {
    let mut out = Vec::new();
    for (i, e) in raw.escalations.iter().enumerate() {
        let at = path!("escalation", i);
        for (j, d) in e.datasets.iter().enumerate() {
            if !datasets.contains_key(d) {
                unknown_dataset(c, at.at("datasets").at(j), d, datasets);
            }
        }
        if e.datasets.len() < 2 {
            c.err(
                at.at("datasets"),
                "an escalation combines at least two datasets",
            );
        }
        if let Some(level) = c.level(at.at("level"), &e.level) {
            out.push(Escalation {
                datasets: e.datasets.iter().cloned().collect(),
                level,
                reason: e.reason.clone(),
            });
        }
    }
    out
}

/// Truncated joins: two private datasets with units of one kind, a declared
/// key column on each side, and a small positive truncation threshold.
fn resolve_truncated_joins(
    c: &mut Checker,
    raw: &RawPolicy,
    datasets: &BTreeMap<String, Dataset>,
) -> Vec<TruncatedJoin> {
    let mut out = Vec::new();
    for (i, t) in raw.truncated_joins.iter().enumerate() {
        let at = path!("truncated_join", i);
        if t.datasets.len() != 2 || t.on.len() != 2 {
            c.err(
                at.at("datasets"),
                "a truncated join names two datasets and one key column of each",
            )
            .help = Some(
                "write datasets = [\"a.x\", \"b.y\"] and on = [\"key_of_a\", \"key_of_b\"]".into(),
            );
            continue;
        }
        let mut kinds = Vec::new();
        for (j, (d, column)) in t.datasets.iter().zip(&t.on).enumerate() {
            let Some(dataset) = datasets.get(d) else {
                unknown_dataset(c, at.at("datasets").at(j), d, datasets);
                continue;
            };
            match &dataset.unit {
                Some(u) if !dataset.is_public() => kinds.push(u.kind),
                _ => {
                    c.err(
                        at.at("datasets").at(j),
                        format!("`{d}` is public: joins with public datasets need no truncation"),
                    );
                }
            }
            if dataset.column(column).is_none() {
                let d = c.err(at.at("on").at(j), format!("`{d}` has no column `{column}`"));
                d.help = suggest(column, dataset.columns.iter().map(|c| c.name.as_str()))
                    .map(|s| format!("did you mean `{s}`?"));
            }
        }
        if let [a, b] = kinds[..]
            && a != b
        {
            c.err(
                at.at("datasets"),
                format!(
                    "the datasets protect different kinds of units ({} and {}); a truncated join bounds one kind of unit",
                    a.as_str(),
                    b.as_str()
                ),
            );
        }
        if !(1..=MAX_MATCHES).contains(&t.max_matches) {
            c.err(
                at.at("max_matches"),
                format!("max_matches must be between 1 and {MAX_MATCHES}"),
            )
            .help = Some(
                "each unit's influence on the joined rows grows with max_matches; keep it small"
                    .into(),
            );
        }
        out.push(TruncatedJoin {
            sides: [
                (t.datasets[0].clone(), t.on[0].clone()),
                (t.datasets[1].clone(), t.on[1].clone()),
            ],
            max_matches: t.max_matches,
            reason: t.reason.clone(),
        });
    }
    out
}

/// The largest truncation threshold a policy may declare.
const MAX_MATCHES: u32 = 1000;

fn unknown_dataset(
    c: &mut Checker,
    at: TomlPath,
    name: &str,
    datasets: &BTreeMap<String, Dataset>,
) {
    let d = c.err(at, format!("unknown dataset `{name}`"));
    d.help = suggest(name, datasets.keys().map(String::as_str))
        .map(|s| format!("did you mean `{s}`?"))
        .or_else(|| Some("declare it in a [[dataset]] table first".into()));
}

fn resolve_dataset(c: &mut Checker, at: &TomlPath, d: &RawDataset) -> Option<Dataset> {
    #![allow(clippy::unnecessary_wraps)]
    if !d.id.contains('.') {
        c.err(
            at.at("id"),
            format!("dataset id `{}` must be `schema.table`", d.id),
        );
    }
    let level = c.level(at.at("level"), &d.level);
    let share = c.word(
        at.at("share"),
        "share attribute",
        &d.share,
        ATTRS,
        Attribute::parse,
    );
    let open = c.word(
        at.at("open"),
        "open attribute",
        &d.open,
        ATTRS,
        Attribute::parse,
    );
    if let Some(l) = &level
        && !l.def().admitted
    {
        let what = if l.def().name == "core" {
            " (核心数据)"
        } else {
            ""
        };
        c.err(
            at.at("level"),
            format!("data of level `{l}`{what} is never admitted to veil"),
        )
        .help = Some("remove the dataset from the policy".into());
    }
    let format = match d.source.format.as_deref() {
        None => Some(SourceFormat::Parquet),
        Some(f) => c.word(
            at.at("source").at("format"),
            "source format",
            f,
            &["parquet", "csv", "arrow"],
            SourceFormat::parse,
        ),
    };
    let mut columns = Vec::new();
    let mut names = BTreeSet::new();
    for (j, col) in d.columns.iter().enumerate() {
        let cat = at.at("column").at(j);
        if !names.insert(col.name.as_str()) {
            c.err(
                cat.at("name"),
                format!("column `{}` is declared twice", col.name),
            );
        }
        let clevel = c.level(cat.at("level"), &col.level);
        let mut allow = BTreeSet::new();
        for (k, u) in col.allow.iter().enumerate() {
            if let Some(u) = c.word(cat.at("allow").at(k), "use", u, USES, Use::parse) {
                allow.insert(u);
            }
        }
        let identifier = col.tags.iter().any(|t| t == "identifier");
        if let (Some(cl), Some(dl)) = (&clevel, &level) {
            if cl > dl {
                c.err(
                    cat.at("level"),
                    format!("column level {cl} is above the dataset level {dl}"),
                )
                .help = Some(format!(
                    "a dataset's level is at least its columns' (就高从严): raise the dataset to {cl}"
                ));
            }
            let over: Vec<_> = allow
                .difference(&cl.ceiling())
                .map(|u| u.as_str())
                .collect();
            if !over.is_empty() {
                c.err(
                    cat.at("allow"),
                    format!(
                        "uses [{}] exceed the ceiling of level {cl}",
                        over.join(", ")
                    ),
                )
                .help = Some(format!(
                    "level {cl} permits at most [{}]",
                    cl.ceiling()
                        .iter()
                        .map(|u| u.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        if let Some(cl) = &clevel
            && cl.def().row_output == RowOutput::IfOpen
            && allow.contains(&Use::Project)
            && open == Some(Attribute::None)
        {
            c.err(cat.at("allow"), format!("`{}` may not appear in output rows: level {cl} allows that only in datasets that are open (open ≠ \"none\")", col.name));
        }
        if identifier
            && allow
                .iter()
                .any(|u| matches!(u, Use::Aggregate | Use::GroupBy | Use::Project))
        {
            c.err(
                cat.at("allow"),
                format!(
                    "`{}` is tagged identifier, so it may only be used for join and filters",
                    col.name
                ),
            );
        }
        let bounds = col.bounds.map(|[lo, hi]| (lo, hi));
        if let Some((lo, hi)) = bounds
            && !(lo.is_finite() && hi.is_finite() && lo <= hi)
        {
            c.err(
                cat.at("bounds"),
                "bounds must be two finite numbers [lo, hi] with lo <= hi",
            );
        }
        let precision = col.precision.unwrap_or(0);
        if precision > 6 {
            c.err(
                cat.at("precision"),
                "precision above 6 decimal digits is not supported",
            );
        }
        let domain = match &col.domain {
            None => None,
            Some(RawDomain::Values(vs)) => {
                let values: Vec<DomainValue> = vs
                    .iter()
                    .map(|v| match v {
                        RawDomainValue::Int(i) => DomainValue::Int(*i),
                        RawDomainValue::Text(s) => DomainValue::Text(s.clone()),
                    })
                    .collect();
                let distinct: BTreeSet<_> = values.iter().collect();
                if distinct.len() != values.len() {
                    c.err(cat.at("domain"), "the domain lists a value twice");
                }
                if values.is_empty() {
                    c.err(cat.at("domain"), "the domain is empty");
                }
                Some(Domain::Values(values))
            }
            Some(RawDomain::Reference { dataset, column }) => Some(Domain::Reference {
                dataset: dataset.clone(),
                column: column.clone(),
            }),
        };
        let bucket = col.bucket.as_ref().map(|b| {
            if !(b.width.is_finite() && b.width > 0.0) {
                c.err(
                    cat.at("bucket").at("width"),
                    "a bucket width must be a positive number",
                );
            }
            Bucket { width: b.width }
        });
        if bucket.is_some() && bounds.is_none() {
            c.err(
                cat.at("bucket"),
                "a bucketed column needs bounds, so that its buckets are a public key set",
            );
        }
        columns.push(Column {
            name: col.name.clone(),
            level: clevel.unwrap_or_else(unknown_level),
            identifier,
            allow,
            bounds,
            precision,
            domain,
            bucket,
        });
    }
    let public = level.as_ref().is_some_and(|l| l.def().dp == DpRule::None)
        && open == Some(Attribute::Unconditional);
    let unit = match &d.privacy_unit {
        Some(u) => {
            let uat = at.at("privacy_unit");
            let kind = c.word(
                uat.at("kind"),
                "privacy unit kind",
                &u.kind,
                UNIT_KINDS,
                UnitKind::parse,
            );
            if u.kind != "row" && !columns.iter().any(|col| col.name == u.column) {
                c.err(
                    uat.at("column"),
                    format!(
                        "privacy unit column `{}` is not declared in this dataset",
                        u.column
                    ),
                );
            }
            if u.max_groups == 0 || u.max_rows == 0 {
                c.err(uat.clone(), "max_groups and max_rows must be at least 1");
            }
            kind.map(|kind| PrivacyUnit {
                column: u.column.clone(),
                kind,
                max_groups: u.max_groups,
                max_rows: u.max_rows,
            })
        }
        None if public => None,
        None => {
            c.err(at.at("id"), format!("dataset `{}` is not public, so it must declare privacy_unit", d.id))
                .help = Some("only general_1 data with open = \"unconditional\" is public; add privacy_unit = { column = …, kind = …, max_groups = …, max_rows = … }".into());
            None
        }
    };
    let mut foreign_keys = Vec::new();
    for (j, fk) in d.foreign_keys.iter().enumerate() {
        if !columns.iter().any(|col| col.name == fk.column) {
            c.err(
                at.at("foreign_keys").at(j).at("column"),
                format!(
                    "foreign key column `{}` is not declared in this dataset",
                    fk.column
                ),
            );
        }
        foreign_keys.push(ForeignKey {
            column: fk.column.clone(),
            references: fk.references.clone(),
        });
    }
    Some(Dataset {
        id: d.id.clone(),
        name: d.name.clone(),
        owner: d.owner.clone(),
        catalog: d.catalog.as_ref().map(|k| (k.code.clone(), k.version)),
        registration_id: d.registration_id.clone(),
        // A bad word was reported above; conservative stand-ins keep the
        // dataset known, so that grants naming it are still checked.
        level: level.unwrap_or_else(unknown_level),
        share: share.unwrap_or(Attribute::None),
        open: open.unwrap_or(Attribute::None),
        source_path: d.source.path.clone(),
        format: format.unwrap_or(SourceFormat::Parquet),
        unit,
        foreign_keys,
        columns,
        budget: d
            .budget
            .as_ref()
            .and_then(|b| resolve_dataset_budget(c, at.at("budget"), b)),
    })
}

/// A dataset's global budget: a unit, a positive total, a window, and δ
/// for an ε budget that zCDP grants draw on.
fn resolve_dataset_budget(
    c: &mut Checker,
    at: TomlPath,
    b: &RawDatasetBudget,
) -> Option<DatasetBudget> {
    let delta = b.delta.unwrap_or(0.0);
    if !(delta.is_finite() && (0.0..1.0).contains(&delta)) {
        c.err(at.at("delta"), "delta must be in [0, 1)");
    }
    if !(b.total.is_finite() && b.total.is_normal() && b.total > 0.0) {
        c.err(
            at.at("total"),
            "the budget must be a positive finite number",
        );
    }
    let window_days = match &b.window {
        Some(w) => {
            let days = iso_duration_days(w);
            if days.is_none() {
                c.err(
                    at.at("window"),
                    format!("window `{w}` is not an ISO 8601 duration in days or weeks"),
                )
                .help = Some("for example \"P30D\", \"P365D\" or \"P4W\"".into());
            }
            days
        }
        None => None,
    };
    let accounting = match b.accounting.as_str() {
        "epsilon" => Accounting::Epsilon { delta },
        "rho" => Accounting::Rho { delta },
        other => {
            c.err(at.at("accounting"), format!("unknown accounting `{other}`"))
                .help = Some(
                "accounting is `epsilon` (pure/approximate DP) or `rho` (zero-concentrated DP)"
                    .into(),
            );
            return None;
        }
    };
    Some(DatasetBudget {
        accounting,
        total: b.total,
        window_days,
    })
}

fn datetime(
    c: &mut Checker,
    at: TomlPath,
    v: &toml::value::Datetime,
) -> Option<DateTime<FixedOffset>> {
    let parsed = DateTime::parse_from_rfc3339(&v.to_string()).ok();
    if parsed.is_none() {
        c.err(
            at,
            "a validity bound must be a full date-time with an offset",
        )
        .help = Some("for example 2026-01-01T00:00:00+08:00".into());
    }
    parsed
}

fn resolve_grant(
    c: &mut Checker,
    at: &TomlPath,
    g: &RawGrant,
    datasets: &BTreeMap<String, Dataset>,
    operators: &BTreeMap<String, Operator>,
) -> Option<Grant> {
    let channel = c.word(
        at.at("channel"),
        "channel",
        &g.channel,
        CHANNELS,
        Channel::parse,
    );
    let purpose = c.word(
        at.at("purpose"),
        "purpose",
        &g.purpose,
        PURPOSES,
        Purpose::parse,
    );
    if !operators.contains_key(&g.grantee) {
        let d = c.err(
            at.at("grantee"),
            format!("grantee `{}` is not a declared operator", g.grantee),
        );
        d.help = suggest(&g.grantee, operators.keys().map(String::as_str))
            .map(|s| format!("did you mean `{s}`?"))
            .or_else(|| Some("declare it in an [[operator]] table".into()));
    }
    let valid_from = datetime(c, at.at("valid_from"), &g.valid_from);
    let valid_until = datetime(c, at.at("valid_until"), &g.valid_until);
    if let (Some(f), Some(u)) = (valid_from, valid_until)
        && f >= u
    {
        c.err(at.at("valid_until"), "valid_until must be after valid_from");
    }
    let hours = g.hours.as_deref().and_then(|h| {
        let parsed = DailyHours::parse(h);
        if parsed.is_none() {
            c.err(
                at.at("hours"),
                format!("daily hours `{h}` are not `HH:MM-HH:MM`"),
            )
            .help = Some("for example hours = \"08:00-20:00\" (Beijing time)".into());
        }
        parsed
    });
    let mut scopes = Vec::new();
    let mut needs_dp = false;
    let mut unbounded = Vec::new();
    for (j, s) in g.scopes.iter().enumerate() {
        let sat = at.at("scope").at(j);
        let Some(ds) = datasets.get(&s.dataset) else {
            unknown_dataset(c, sat.at("dataset"), &s.dataset, datasets);
            continue;
        };
        needs_dp |= !ds.is_public();
        if purpose == Some(Purpose::Commercial) && ds.registration_id.is_none() && !ds.is_public() {
            c.err(
                sat.at("dataset"),
                format!("commercial use of `{}` needs a registered dataset", ds.id),
            )
            .help = Some("add its registration_id (公共数据资源登记编号) to the dataset".into());
        }
        if let Some(p) = purpose
            && ds.level.def().admitted
            && !ds.level.def().purposes.contains(&p)
        {
            let allowed: Vec<String> = ds
                .level
                .def()
                .purposes
                .iter()
                .map(|p| p.to_string())
                .collect();
            let what = if ds.level.def().name == "important" {
                " (重要数据)"
            } else {
                ""
            };
            c.err(
                sat.at("dataset"),
                format!(
                    "`{}` is graded {}{what}: it may only be granted for {}",
                    ds.id,
                    ds.level,
                    list_or_nothing(&allowed)
                ),
            )
            .help =
                Some("change the grant's purpose, or remove the dataset from this grant".into());
        }
        needs_dp |= match ds.level.def().dp {
            DpRule::Required => true,
            DpRule::Commercial => purpose == Some(Purpose::Commercial),
            DpRule::Optional | DpRule::None => false,
        };
        let mut columns = BTreeMap::new();
        for (name, uses) in &s.columns {
            let cat = sat.at("columns").at(name.as_str());
            let Some(col) = ds.column(name) else {
                let d = c.err(cat, format!("`{}` has no column `{name}`", ds.id));
                d.help = suggest(name, ds.columns.iter().map(|c| c.name.as_str()))
                    .map(|s| format!("did you mean `{s}`?"));
                continue;
            };
            let mut set = BTreeSet::new();
            for (k, u) in uses.iter().enumerate() {
                if let Some(u) = c.word(cat.at(k), "use", u, USES, Use::parse) {
                    set.insert(u);
                }
            }
            let over: Vec<_> = set.difference(&col.allow).map(|u| u.as_str()).collect();
            if !over.is_empty() {
                c.err(
                    cat.clone(),
                    format!(
                        "uses [{}] of `{}.{name}` are not in the dataset's allow list",
                        over.join(", "),
                        ds.id
                    ),
                )
                .help = Some(format!(
                    "the data owner allows [{}]; a grant may only narrow that",
                    col.allow
                        .iter()
                        .map(|u| u.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if set.contains(&Use::Aggregate) && col.bounds.is_none() && !ds.is_public() {
                unbounded.push((cat.clone(), format!("{}.{name}", ds.id)));
            }
            columns.insert(name.clone(), set);
        }
        if let Some(f) = &s.row_filter {
            check_row_filter(c, sat.at("row_filter"), f, ds);
        }
        scopes.push(Scope {
            dataset: s.dataset.clone(),
            row_filter: s.row_filter.clone(),
            columns,
        });
    }
    let dp = g.dp.as_ref().and_then(|dp| {
        let dat = at.at("dp");
        let accounting = match dp.accounting.as_str() {
            "epsilon" => Some(Accounting::Epsilon {
                delta: dp.delta.unwrap_or(0.0),
            }),
            "rho" => Some(Accounting::Rho {
                delta: dp.delta.unwrap_or(0.0),
            }),
            other => {
                let d = c.err(
                    dat.at("accounting"),
                    format!("unknown accounting `{other}`"),
                );
                d.help = Some(
                    "accounting is `epsilon` (pure/approximate DP) or `rho` (zero-concentrated DP)"
                        .into(),
                );
                None
            }
        };
        let positive = |x: f64| x.is_finite() && x.is_normal() && x > 0.0;
        if !positive(dp.budget) {
            c.err(
                dat.at("budget"),
                "the budget must be a positive finite number",
            );
        }
        if !positive(dp.per_query_max) {
            c.err(
                dat.at("per_query_max"),
                "per_query_max must be a positive finite number",
            );
        } else if positive(dp.budget) && dp.per_query_max > dp.budget {
            c.err(
                dat.at("per_query_max"),
                "per_query_max is larger than the whole budget",
            );
        }
        if let Some(d) = dp.delta
            && !(d.is_finite() && (0.0..1.0).contains(&d))
        {
            c.err(dat.at("delta"), "delta must be in [0, 1)");
        }
        if let Some(w) = &dp.window
            && iso_duration_days(w).is_none()
        {
            c.err(
                dat.at("window"),
                format!("window `{w}` is not an ISO 8601 duration in days or weeks"),
            )
            .help = Some("for example \"P30D\", \"P90D\" or \"P4W\"".into());
        }
        if dp.max_groups == Some(0) {
            c.err(dat.at("max_groups"), "max_groups must be at least 1");
        }
        accounting.map(|accounting| DpSettings {
            accounting,
            budget: dp.budget,
            per_query: dp.per_query_max,
            window: dp.window.clone(),
            max_groups: dp.max_groups,
            other_row: dp.other_row.unwrap_or(false),
        })
    });
    if needs_dp && g.dp.is_none() {
        c.err(
            at.at("id"),
            format!(
                "grant `{}` covers private data and must declare [grant.dp]",
                g.id
            ),
        );
    }
    if dp.is_some() {
        for (cat, col) in unbounded {
            c.err(
                cat,
                format!("`{col}` is granted for aggregate under DP but declares no bounds"),
            )
            .help = Some("ask the data owner to declare bounds = [lo, hi] on the column".into());
        }
    }
    let pricing = match &g.pricing {
        None => Pricing::Free { conditions: None },
        Some(p) if p.model == "free" => Pricing::Free {
            conditions: p.conditions.clone(),
        },
        Some(p) if p.model == "guided_price" => {
            let pat = at.at("pricing");
            let (price, cap) = (
                p.price_cny.unwrap_or(f64::NAN),
                p.cap_cny.unwrap_or(f64::NAN),
            );
            if !(price.is_finite() && price >= 0.0) {
                c.err(
                    pat.at("price_cny"),
                    "guided_price needs price_cny, a non-negative amount",
                );
            }
            if !(cap.is_finite() && cap >= 0.0) {
                c.err(
                    pat.at("cap_cny"),
                    "guided_price needs cap_cny, the published cap",
                );
            } else if price > cap {
                c.err(
                    pat.at("price_cny"),
                    format!("the price {price} CNY is above the published cap {cap} CNY"),
                );
            }
            Pricing::GuidedPrice {
                unit: p.unit.clone().unwrap_or_else(|| "per_query".to_owned()),
                price_cny: price,
                cap_cny: cap,
            }
        }
        Some(p) => {
            let d = c.err(
                at.at("pricing").at("model"),
                format!("unknown pricing model `{}`", p.model),
            );
            d.help = Some(match suggest(&p.model, ["free", "guided_price"]) {
                Some(s) => format!("did you mean `{s}`?"),
                None => "the model is `free` or `guided_price`".into(),
            });
            Pricing::Free { conditions: None }
        }
    };
    if purpose == Some(Purpose::Commercial) && !matches!(pricing, Pricing::GuidedPrice { .. }) {
        c.err(
            at.at("purpose"),
            "commercial grants must use guided_price (政府指导价)",
        );
    }
    let limits = g.limits.clone().unwrap_or_default();
    let mut agg_functions = BTreeSet::new();
    for (k, f) in limits
        .agg_functions
        .clone()
        .unwrap_or_else(|| vec!["COUNT".into(), "SUM".into(), "AVG".into()])
        .iter()
        .enumerate()
    {
        let upper = f.to_ascii_uppercase();
        if AGGREGATES.contains(&upper.as_str()) {
            agg_functions.insert(upper);
        } else {
            c.word::<()>(
                at.at("limits").at("agg_functions").at(k),
                "aggregate function",
                f,
                AGGREGATES,
                |_| None,
            );
        }
    }
    Some(Grant {
        id: g.id.clone(),
        channel: channel?,
        grantee: g.grantee.clone(),
        agency: g.agency.clone(),
        agreement: g.agreement.clone(),
        purpose: purpose?,
        purpose_detail: g.purpose_detail.clone(),
        products: g.products.clone(),
        valid_from: valid_from?,
        valid_until: valid_until?,
        hours,
        scopes,
        agg_functions,
        min_group_size: limits.min_group_size.unwrap_or(0),
        max_queries_per_day: limits.max_queries_per_day,
        max_result_rows: limits.max_result_rows.unwrap_or(10_000),
        dp,
        pricing,
        audit_query_text: g.audit_query_text.unwrap_or(true),
    })
}

fn list_or_nothing(v: &[String]) -> String {
    if v.is_empty() {
        "nothing".to_owned()
    } else {
        v.join(", ")
    }
}

/// A row filter must parse as a SQL predicate over the dataset's columns,
/// built from comparisons, AND/OR/NOT, IN, BETWEEN, LIKE and IS NULL.
fn check_row_filter(c: &mut Checker, at: TomlPath, text: &str, ds: &Dataset) {
    use sqlparser::ast::{Expr, visit_expressions};
    use sqlparser::dialect::GenericDialect;
    use sqlparser::parser::Parser;
    use std::ops::ControlFlow;

    let parsed = Parser::new(&GenericDialect {})
        .with_recursion_limit(32)
        .try_with_sql(text)
        .and_then(|mut p| {
            let e = p.parse_expr()?;
            p.expect_token(&sqlparser::tokenizer::Token::EOF)?;
            Ok(e)
        });
    let expr = match parsed {
        Ok(e) => e,
        Err(e) => {
            c.err(at, format!("the row filter does not parse: {e}"))
                .help = Some("write a SQL predicate such as pay_month >= '2024-01'".into());
            return;
        }
    };
    let mut problems = Vec::new();
    let _ = visit_expressions(&expr, |e: &Expr| {
        match e {
            Expr::Identifier(id) if ds.column(&id.value).is_none() => {
                problems.push(format!(
                    "the row filter names `{}`, which is not a column of `{}`",
                    id.value, ds.id
                ));
            }
            Expr::CompoundIdentifier(_) => {
                problems.push("write row-filter columns without a table prefix".into())
            }
            Expr::Function(_)
            | Expr::Subquery(_)
            | Expr::Exists { .. }
            | Expr::InSubquery { .. } => {
                problems.push("row filters may not call functions or contain subqueries".into());
            }
            _ => {}
        }
        ControlFlow::<()>::Continue(())
    });
    for p in problems {
        c.err(at.clone(), p);
    }
}

/// Days in an ISO 8601 duration of whole days or weeks (`P30D`, `P4W`).
pub fn iso_duration_days(s: &str) -> Option<u32> {
    let body = s.strip_prefix('P')?;
    let (n, unit) = body.split_at(body.len().checked_sub(1)?);
    let n: u32 = n.parse().ok()?;
    match unit {
        "D" if n > 0 => Some(n),
        "W" if n > 0 => n.checked_mul(7),
        _ => None,
    }
}
