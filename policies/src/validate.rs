//! `RawPolicy` → `Policy`: resolves names and checks every loading rule of
//! POLICY.md, collecting all problems instead of stopping at the first.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, FixedOffset};
use sha2::{Digest, Sha256};

use crate::model::*;
use crate::raw::*;
use crate::{Diagnostic, PolicyError};

struct Checker {
    problems: Vec<Diagnostic>,
}

impl Checker {
    fn err(&mut self, at: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Diagnostic {
            at: at.into(),
            message: message.into(),
        });
    }

    fn parse<T>(
        &mut self,
        at: &str,
        what: &str,
        value: &str,
        allowed: &str,
        f: fn(&str) -> Option<T>,
    ) -> Option<T> {
        let parsed = f(value);
        if parsed.is_none() {
            self.err(
                at,
                format!("unknown {what} `{value}`; expected one of {allowed}"),
            );
        }
        parsed
    }
}

const LEVELS: &str = "core, important, general_4, general_3, general_2, general_1";
const ATTRS: &str = "unconditional, conditional, none";
const USES: &str = "project, group_by, aggregate, filter, filter_literal, join";

/// Validates and resolves a raw policy; the hash covers the canonical form.
pub fn resolve(raw: &RawPolicy) -> Result<Policy, PolicyError> {
    let mut c = Checker {
        problems: Vec::new(),
    };
    if raw.policy.grading_scheme != "GB/T 43697-2024" {
        c.err(
            "[policy].grading_scheme",
            format!(
                "unknown grading scheme `{}`; only `GB/T 43697-2024` is built in",
                raw.policy.grading_scheme
            ),
        );
    }
    let mut datasets = BTreeMap::new();
    for d in &raw.datasets {
        if let Some(ds) = resolve_dataset(&mut c, d)
            && datasets.insert(ds.id.clone(), ds).is_some()
        {
            c.err(format!("dataset `{}`", d.id), "dataset id declared twice");
        }
    }
    let mut operators = BTreeMap::new();
    for o in &raw.operators {
        let at = format!("operator `{}`", o.id);
        let mut hashes = Vec::new();
        for t in &o.tokens {
            match t
                .strip_prefix("sha256:")
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
            {
                Some(h) => hashes.push(h),
                None => c.err(
                    &at,
                    "token must be `sha256:` followed by 64 hex digits (the hash, never the token itself)",
                ),
            }
        }
        if operators
            .insert(
                o.id.clone(),
                Operator::new(o.id.clone(), o.org.clone(), hashes),
            )
            .is_some()
        {
            c.err(&at, "operator id declared twice");
        }
    }
    let mut grants = Vec::new();
    for g in &raw.grants {
        if let Some(grant) = resolve_grant(&mut c, g, &datasets, &operators) {
            grants.push(grant);
        }
    }
    let mut ids = BTreeSet::new();
    for g in &grants {
        if !ids.insert(g.id.as_str()) {
            c.err(format!("grant `{}`", g.id), "grant id declared twice");
        }
    }
    if !c.problems.is_empty() {
        return Err(PolicyError {
            diagnostics: c.problems,
        });
    }
    Ok(Policy {
        id: raw.policy.id.clone(),
        version: raw.policy.version.clone(),
        hash: canonical_hash(raw),
        datasets,
        operators,
        grants,
    })
}

fn canonical_hash(raw: &RawPolicy) -> String {
    // Field order is fixed by the struct definitions, so this text does not
    // depend on the file's key order, comments or whitespace.
    let canonical = toml::to_string(raw).unwrap_or_default();
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

fn resolve_dataset(c: &mut Checker, d: &RawDataset) -> Option<Dataset> {
    let at = format!("dataset `{}`", d.id);
    if !d.id.contains('.') {
        c.err(&at, "dataset id must be `schema.table`");
    }
    let level = c.parse(&at, "level", &d.level, LEVELS, Level::parse);
    let share = c.parse(&at, "share attribute", &d.share, ATTRS, Attribute::parse);
    let open = c.parse(&at, "open attribute", &d.open, ATTRS, Attribute::parse);
    if level == Some(Level::Core) {
        c.err(
            &at,
            "core data (核心数据) is never admitted to veil; remove the dataset",
        );
    }
    if let Some(f) = &d.source.format
        && f != "parquet"
    {
        c.err(
            &at,
            format!("source format `{f}` is not supported yet; use parquet"),
        );
    }
    let mut columns = Vec::new();
    for col in &d.columns {
        let cat = format!("{at} column `{}`", col.name);
        let clevel = c.parse(&cat, "level", &col.level, LEVELS, Level::parse);
        let mut allow = BTreeSet::new();
        for u in &col.allow {
            if let Some(u) = c.parse(&cat, "use", u, USES, Use::parse) {
                allow.insert(u);
            }
        }
        let identifier = col.tags.iter().any(|t| t == "identifier");
        if let (Some(cl), Some(dl)) = (clevel, level) {
            if cl > dl {
                c.err(
                    &cat,
                    format!("column level {cl} is above the dataset level {dl} (就高从严: raise the dataset level)"),
                );
            }
            let over: Vec<_> = allow
                .difference(&cl.ceiling())
                .map(|u| u.as_str())
                .collect();
            if !over.is_empty() {
                c.err(
                    &cat,
                    format!(
                        "uses [{}] exceed the ceiling of level {cl}",
                        over.join(", ")
                    ),
                );
            }
        }
        if identifier
            && allow
                .iter()
                .any(|u| matches!(u, Use::Aggregate | Use::GroupBy | Use::Project))
        {
            c.err(
                &cat,
                "an identifier column may only be used for join or filter",
            );
        }
        let bounds = col.bounds.map(|[lo, hi]| (lo, hi));
        if let Some((lo, hi)) = bounds
            && !(lo.is_finite() && hi.is_finite() && lo <= hi)
        {
            c.err(&cat, "bounds must be finite with lo <= hi");
        }
        let precision = col.precision.unwrap_or(0);
        if precision > 6 {
            c.err(&cat, "precision above 6 decimal digits is not supported");
        }
        let domain = col.domain.as_ref().map(|vs| {
            vs.iter()
                .map(|v| match v {
                    RawDomainValue::Int(i) => DomainValue::Int(*i),
                    RawDomainValue::Text(s) => DomainValue::Text(s.clone()),
                })
                .collect::<Vec<_>>()
        });
        if let Some(dom) = &domain {
            let distinct: BTreeSet<_> = dom.iter().collect();
            if distinct.len() != dom.len() {
                c.err(&cat, "domain lists a value twice");
            }
            if dom.is_empty() {
                c.err(&cat, "domain is empty");
            }
        }
        columns.push(Column {
            name: col.name.clone(),
            level: clevel.unwrap_or(Level::Core),
            identifier,
            allow,
            bounds,
            precision,
            domain,
        });
    }
    let public = level == Some(Level::General1) && open == Some(Attribute::Unconditional);
    let unit = match &d.privacy_unit {
        Some(u) => {
            let kind = match u.kind.as_str() {
                "natural_person" => Some(UnitKind::NaturalPerson),
                "legal_person" => Some(UnitKind::LegalPerson),
                "household" => Some(UnitKind::Household),
                "row" => Some(UnitKind::Row),
                other => {
                    c.err(
                        &at,
                        format!("unknown privacy unit kind `{other}`; expected natural_person, legal_person, household or row"),
                    );
                    None
                }
            };
            if u.kind != "row" && !columns.iter().any(|col| col.name == u.column) {
                c.err(
                    &at,
                    format!("privacy unit column `{}` is not declared", u.column),
                );
            }
            if u.max_groups == 0 || u.max_rows == 0 {
                c.err(
                    &at,
                    "privacy unit max_groups and max_rows must be at least 1",
                );
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
            c.err(
                &at,
                "a dataset that is not public (general_1, open = unconditional) must declare privacy_unit",
            );
            None
        }
    };
    Some(Dataset {
        id: d.id.clone(),
        name: d.name.clone(),
        owner: d.owner.clone(),
        registration_id: d.registration_id.clone(),
        level: level?,
        share: share?,
        open: open?,
        source_path: d.source.path.clone(),
        unit,
        columns,
    })
}

fn datetime(
    c: &mut Checker,
    at: &str,
    what: &str,
    v: &toml::value::Datetime,
) -> Option<DateTime<FixedOffset>> {
    let parsed = DateTime::parse_from_rfc3339(&v.to_string()).ok();
    if parsed.is_none() {
        c.err(
            at,
            format!("{what} must be a full date-time with offset, e.g. 2026-01-01T00:00:00+08:00"),
        );
    }
    parsed
}

fn resolve_grant(
    c: &mut Checker,
    g: &RawGrant,
    datasets: &BTreeMap<String, Dataset>,
    operators: &BTreeMap<String, Operator>,
) -> Option<Grant> {
    let at = format!("grant `{}`", g.id);
    let channel = c.parse(
        &at,
        "channel",
        &g.channel,
        "sharing, opening, authorized_operation",
        |s| {
            Some(match s {
                "sharing" => Channel::Sharing,
                "opening" => Channel::Opening,
                "authorized_operation" => Channel::AuthorizedOperation,
                _ => return None,
            })
        },
    );
    let purpose = c.parse(
        &at,
        "purpose",
        &g.purpose,
        "public_governance, public_welfare, commercial",
        |s| {
            Some(match s {
                "public_governance" => Purpose::PublicGovernance,
                "public_welfare" => Purpose::PublicWelfare,
                "commercial" => Purpose::Commercial,
                _ => return None,
            })
        },
    );
    if !operators.contains_key(&g.grantee) {
        c.err(
            &at,
            format!("grantee `{}` is not a declared operator", g.grantee),
        );
    }
    let valid_from = datetime(c, &at, "valid_from", &g.valid_from);
    let valid_until = datetime(c, &at, "valid_until", &g.valid_until);
    if let (Some(f), Some(u)) = (valid_from, valid_until)
        && f >= u
    {
        c.err(&at, "valid_from must be before valid_until");
    }
    let mut scopes = Vec::new();
    let mut needs_dp = false;
    let mut aggregates_unbounded = Vec::new();
    for s in &g.scopes {
        let sat = format!("{at} scope `{}`", s.dataset);
        let Some(ds) = datasets.get(&s.dataset) else {
            c.err(&sat, format!("unknown dataset `{}`", s.dataset));
            continue;
        };
        needs_dp |= !ds.is_public();
        if purpose == Some(Purpose::Commercial) && ds.registration_id.is_none() && !ds.is_public() {
            c.err(
                &sat,
                "commercial use needs a registered dataset (公共数据资源登记编号); add registration_id to the dataset",
            );
        }
        if ds.level == Level::Important && purpose != Some(Purpose::PublicGovernance) {
            c.err(
                &sat,
                "important data may only be granted for public_governance",
            );
        }
        let mut columns = BTreeMap::new();
        for (name, uses) in &s.columns {
            let Some(col) = ds.column(name) else {
                c.err(
                    &sat,
                    format!("unknown column `{name}` in dataset `{}`", ds.id),
                );
                continue;
            };
            let mut set = BTreeSet::new();
            for u in uses {
                if let Some(u) = c.parse(&sat, "use", u, USES, Use::parse) {
                    set.insert(u);
                }
            }
            let over: Vec<_> = set.difference(&col.allow).map(|u| u.as_str()).collect();
            if !over.is_empty() {
                c.err(
                    &sat,
                    format!(
                        "column `{name}`: uses [{}] are not in the dataset's allow list",
                        over.join(", ")
                    ),
                );
            }
            if set.contains(&Use::Aggregate) && col.bounds.is_none() && !ds.is_public() {
                aggregates_unbounded.push(name.clone());
            }
            columns.insert(name.clone(), set);
        }
        scopes.push(Scope {
            dataset: s.dataset.clone(),
            row_filter: s.row_filter.clone(),
            columns,
        });
    }
    let dp = match &g.dp {
        Some(dp) => {
            let accounting = match dp.accounting.as_str() {
                "epsilon" => Some(Accounting::Epsilon {
                    delta: dp.delta.unwrap_or(0.0),
                }),
                "rho" => Some(Accounting::Rho),
                other => {
                    c.err(
                        &at,
                        format!("unknown accounting `{other}`; expected epsilon or rho"),
                    );
                    None
                }
            };
            let positive = |x: f64| x.is_finite() && x > 0.0 && x.is_normal();
            if !positive(dp.budget) || !positive(dp.per_query_max) {
                c.err(
                    &at,
                    "dp budget and per_query_max must be finite and positive",
                );
            } else if dp.per_query_max > dp.budget {
                c.err(&at, "dp per_query_max is larger than the budget");
            }
            if let Some(d) = dp.delta
                && !(d.is_finite() && (0.0..1.0).contains(&d))
            {
                c.err(&at, "dp delta must be in [0, 1)");
            }
            accounting.map(|accounting| DpSettings {
                accounting,
                budget: dp.budget,
                per_query: dp.per_query_max,
                window: dp.window.clone(),
            })
        }
        None => None,
    };
    if needs_dp && dp.is_none() {
        c.err(&at, "grant covers private data and must declare [grant.dp]");
    }
    if dp.is_some() {
        for col in aggregates_unbounded {
            c.err(
                &at,
                format!("column `{col}` is granted for aggregate under DP but has no bounds; declare bounds on the dataset column"),
            );
        }
    }
    let pricing = match &g.pricing {
        None => Pricing::Free { conditions: None },
        Some(p) if p.model == "free" => Pricing::Free {
            conditions: p.conditions.clone(),
        },
        Some(p) if p.model == "guided_price" => {
            let (price, cap) = (
                p.price_cny.unwrap_or(f64::NAN),
                p.cap_cny.unwrap_or(f64::NAN),
            );
            if !(price.is_finite() && cap.is_finite() && price >= 0.0) {
                c.err(&at, "guided_price needs price_cny and cap_cny");
            } else if price > cap {
                c.err(
                    &at,
                    format!("price {price} CNY is above the published cap {cap} CNY"),
                );
            }
            Pricing::GuidedPrice {
                unit: p.unit.clone().unwrap_or_else(|| "per_query".to_owned()),
                price_cny: price,
                cap_cny: cap,
            }
        }
        Some(p) => {
            c.err(
                &at,
                format!(
                    "unknown pricing model `{}`; expected free or guided_price",
                    p.model
                ),
            );
            Pricing::Free { conditions: None }
        }
    };
    if purpose == Some(Purpose::Commercial) && !matches!(pricing, Pricing::GuidedPrice { .. }) {
        c.err(&at, "commercial grants must use guided_price (政府指导价)");
    }
    let limits = g.limits.clone().unwrap_or_default();
    let agg_functions = limits
        .agg_functions
        .unwrap_or_else(|| vec!["COUNT".into(), "SUM".into(), "AVG".into()])
        .into_iter()
        .map(|f| f.to_ascii_uppercase())
        .collect();
    Some(Grant {
        id: g.id.clone(),
        channel: channel?,
        grantee: g.grantee.clone(),
        purpose: purpose?,
        purpose_detail: g.purpose_detail.clone(),
        valid_from: valid_from?,
        valid_until: valid_until?,
        scopes,
        agg_functions,
        min_group_size: limits.min_group_size.unwrap_or(0),
        max_result_rows: limits.max_result_rows.unwrap_or(10_000),
        dp,
        pricing,
    })
}
