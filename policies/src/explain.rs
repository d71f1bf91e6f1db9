//! `veil policy explain`: what a policy lets an operator do, or who may use a
//! dataset, in plain words for officers and operators.

use std::fmt::Write as _;

use chrono::{DateTime, FixedOffset};

use crate::model::*;

fn when(t: &DateTime<FixedOffset>) -> String {
    t.format("%Y-%m-%d %H:%M %:z").to_string()
}

fn status(g: &Grant, now: DateTime<FixedOffset>) -> &'static str {
    if now < g.valid_from {
        "not yet in force"
    } else if now > g.valid_until {
        "EXPIRED"
    } else {
        "in force"
    }
}

fn list(items: impl IntoIterator<Item = String>) -> String {
    let v: Vec<String> = items.into_iter().collect();
    if v.is_empty() {
        "—".to_owned()
    } else {
        v.join(", ")
    }
}

fn budget(dp: &DpSettings) -> String {
    let (unit, noise) = match dp.accounting {
        Accounting::Epsilon { delta } if delta > 0.0 => {
            (format!("ε (δ = {delta})"), "discrete Laplace")
        }
        Accounting::Epsilon { .. } => ("ε".to_owned(), "discrete Laplace"),
        Accounting::Rho { delta } if delta > 0.0 => (
            format!("ρ (zero-concentrated DP, δ = {delta})"),
            "discrete Gaussian",
        ),
        Accounting::Rho { .. } => ("ρ (zero-concentrated DP)".to_owned(), "discrete Gaussian"),
    };
    let window = match &dp.window {
        Some(w) => format!(", refreshed every {w}"),
        None => ", never refreshed".to_owned(),
    };
    format!(
        "{} {unit} in total{window}; each query costs {} ({noise} noise)",
        dp.budget, dp.per_query
    )
}

fn price(p: &Pricing) -> String {
    match p {
        Pricing::Free {
            conditions: Some(c),
        } => format!("free, on condition: {c}"),
        Pricing::Free { conditions: None } => "free".to_owned(),
        Pricing::GuidedPrice {
            unit,
            price_cny,
            cap_cny,
        } => {
            format!(
                "government-guided price (政府指导价) {price_cny:.2} CNY {unit}, published cap {cap_cny:.2} CNY"
            )
        }
    }
}

fn uses_of(scope: &Scope, u: Use) -> String {
    list(
        scope
            .columns
            .iter()
            .filter(|(_, uses)| uses.contains(&u))
            .map(|(c, _)| c.clone()),
    )
}

fn describe_scope(out: &mut String, policy: &Policy, scope: &Scope) {
    let Some(ds) = policy.datasets.get(&scope.dataset) else {
        return;
    };
    let privacy = match &ds.unit {
        None => "public data: exact answers, no privacy budget".to_owned(),
        Some(u) => format!(
            "private: each person or entity (`{}`) counts in at most {} group(s), with at most {} row(s) each",
            u.column, u.max_groups, u.max_rows
        ),
    };
    let _ = writeln!(
        out,
        "    {} «{}» (owner {}, level {}) — {privacy}",
        ds.id, ds.name, ds.owner, ds.level
    );
    for (label, u) in [
        ("appear in output rows", Use::Project),
        ("group by", Use::GroupBy),
        ("aggregate", Use::Aggregate),
        ("compare with literals", Use::FilterLiteral),
        ("filter by other columns", Use::Filter),
        ("join on", Use::Join),
    ] {
        let cols = uses_of(scope, u);
        if cols != "—" {
            let _ = writeln!(out, "      {label}: {cols}");
        }
    }
    for (name, uses) in &scope.columns {
        if uses.contains(&Use::Aggregate)
            && let Some((lo, hi)) = ds.column(name).and_then(|c| c.bounds)
        {
            let _ = writeln!(
                out,
                "      `{name}` is clamped to [{lo}, {hi}] before aggregation"
            );
        }
    }
    if let Some(f) = &scope.row_filter {
        let _ = writeln!(out, "      only rows where {f} (mandatory row filter)");
    }
}

/// What `operator` may do under `policy`, as of `now`.
pub fn explain_operator(
    policy: &Policy,
    operator: &str,
    now: DateTime<FixedOffset>,
) -> Option<String> {
    let op = policy.operators.get(operator)?;
    let mut out = String::new();
    let _ = writeln!(out, "Operator {} ({})", op.id, op.org);
    let grants: Vec<&Grant> = policy.grants_of(operator).collect();
    if grants.is_empty() {
        let _ = writeln!(
            out,
            "  has no grant: it may connect but cannot query anything"
        );
    }
    for g in grants {
        let _ = writeln!(
            out,
            "\n  Grant {} — {}, purpose {}{}",
            g.id,
            g.channel,
            g.purpose,
            g.purpose_detail
                .as_ref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "    valid {} → {} ({})",
            when(&g.valid_from),
            when(&g.valid_until),
            status(g, now)
        );
        if let Some(h) = &g.hours {
            let _ = writeln!(
                out,
                "    only between {:02}:{:02} and {:02}:{:02} Beijing time",
                h.from_minute / 60,
                h.from_minute % 60,
                h.until_minute / 60,
                h.until_minute % 60
            );
        }
        if let Some(a) = &g.agreement {
            let _ = writeln!(
                out,
                "    agreement {a}{}",
                g.agency
                    .as_ref()
                    .map(|x| format!(", implementing agency {x}"))
                    .unwrap_or_default()
            );
        }
        if !g.products.is_empty() {
            let _ = writeln!(out, "    for products: {}", g.products.join(", "));
        }
        let _ = writeln!(out, "    may query:");
        for s in &g.scopes {
            describe_scope(&mut out, policy, s);
        }
        let _ = writeln!(
            out,
            "    with aggregates {}{}{}",
            list(g.agg_functions.iter().cloned()),
            if g.min_group_size > 0 {
                format!(
                    "; groups of at least {} people or entities",
                    g.min_group_size
                )
            } else {
                String::new()
            },
            g.max_queries_per_day
                .map(|n| format!("; at most {n} queries a day"))
                .unwrap_or_default()
        );
        match &g.dp {
            Some(dp) => {
                let _ = writeln!(out, "    privacy budget: {}", budget(dp));
            }
            None => {
                let _ = writeln!(out, "    privacy budget: none needed (public data only)");
            }
        }
        let _ = writeln!(out, "    price: {}", price(&g.pricing));
    }
    Some(out)
}

/// Who may use `dataset` under `policy`, and how, as of `now`.
pub fn explain_dataset(
    policy: &Policy,
    dataset: &str,
    now: DateTime<FixedOffset>,
) -> Option<String> {
    let ds = policy.datasets.get(dataset)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Dataset {} «{}» — owner {}, level {}",
        ds.id, ds.name, ds.owner, ds.level
    );
    if let Some(r) = &ds.registration_id {
        let _ = writeln!(out, "  registration (公共数据资源登记编号) {r}");
    }
    // Which private datasets a query may join it with on the person
    // (关联): one ID space of units, by name and kind or a foreign key.
    if let Some(unit) = &ds.unit {
        let linked: Vec<String> = policy
            .datasets
            .values()
            .filter(|o| o.id != ds.id && !o.is_public())
            .filter(|o| policy.share_units(&ds.id, &o.id))
            .filter_map(|o| {
                let ou = o.unit.as_ref()?;
                Some(format!("{} (on {} = {})", o.id, unit.column, ou.column))
            })
            .collect();
        if !linked.is_empty() {
            let _ = writeln!(
                out,
                "  may be joined on the person (关联) with: {}",
                linked.join(", ")
            );
        }
    }
    for e in policy
        .escalations
        .iter()
        .filter(|e| e.datasets.contains(dataset))
    {
        let others: Vec<&str> = e
            .datasets
            .iter()
            .map(String::as_str)
            .filter(|d| *d != dataset)
            .collect();
        let _ = writeln!(
            out,
            "  read together with {} it is graded {} (就高从严){}",
            others.join(" and "),
            e.level,
            e.reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    for t in &policy.truncated_joins {
        let [(a, ka), (b, kb)] = &t.sides;
        let (key, other, other_key) = match () {
            _ if a == dataset => (ka, b, kb),
            _ if b == dataset => (kb, a, ka),
            _ => continue,
        };
        let _ = writeln!(
            out,
            "  may be joined with {other} on {key} = {other_key}, each side truncated to {} rows per key (截断关联){}",
            t.max_matches,
            t.reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    }
    let grants: Vec<&Grant> = policy
        .grants
        .iter()
        .filter(|g| g.scope(dataset).is_some())
        .collect();
    if grants.is_empty() {
        let _ = writeln!(out, "  no grant covers it: nobody may query it");
    }
    for g in grants {
        let org = policy
            .operators
            .get(&g.grantee)
            .map(|o| o.org.as_str())
            .unwrap_or("?");
        let _ = writeln!(
            out,
            "\n  {} ({org}) under grant {} — purpose {}, {} → {} ({})",
            g.grantee,
            g.id,
            g.purpose,
            when(&g.valid_from),
            when(&g.valid_until),
            status(g, now)
        );
        if let Some(s) = g.scope(dataset) {
            describe_scope(&mut out, policy, s);
        }
        if let Some(dp) = &g.dp {
            let _ = writeln!(out, "    privacy budget: {}", budget(dp));
        }
    }
    Some(out)
}
