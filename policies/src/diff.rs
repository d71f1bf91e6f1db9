//! `veil policy diff`: what changed in effective permissions between two
//! policies — grants widened or narrowed, budgets, validity — not a text diff.

use std::collections::BTreeSet;

use crate::model::*;

/// Direction of a change, from the operators' point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// Operators may do more.
    Widened,
    /// Operators may do less.
    Narrowed,
    /// Neither more nor less (e.g. a price or a text changed).
    Changed,
}

/// One change in effective permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Direction.
    pub change: Change,
    /// What, in plain words.
    pub what: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = match self.change {
            Change::Widened => "+ widened ",
            Change::Narrowed => "- narrowed",
            Change::Changed => "~ changed ",
        };
        write!(f, "{mark}  {}", self.what)
    }
}

struct Out(Vec<Difference>);

impl Out {
    fn push(&mut self, change: Change, what: String) {
        self.0.push(Difference { change, what });
    }

    fn more_or_less<T: PartialOrd + std::fmt::Display>(
        &mut self,
        what: &str,
        old: T,
        new: T,
        more_is_wider: bool,
    ) {
        if old == new {
            return;
        }
        let wider = (new > old) == more_is_wider;
        self.push(
            if wider {
                Change::Widened
            } else {
                Change::Narrowed
            },
            format!("{what}: {old} → {new}"),
        );
    }
}

fn uses(s: &BTreeSet<Use>) -> String {
    s.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(", ")
}

impl Out {
    /// Uses gained are a widening, uses lost a narrowing.
    fn uses_changed(
        &mut self,
        before: &BTreeSet<Use>,
        after: &BTreeSet<Use>,
        gained: impl Fn(&str) -> String,
        lost: impl Fn(&str) -> String,
    ) {
        let added: BTreeSet<Use> = after.difference(before).copied().collect();
        let removed: BTreeSet<Use> = before.difference(after).copied().collect();
        if !added.is_empty() {
            self.push(Change::Widened, gained(&uses(&added)));
        }
        if !removed.is_empty() {
            self.push(Change::Narrowed, lost(&uses(&removed)));
        }
    }
}

/// The differences in effective permissions from `old` to `new`.
pub fn diff(old: &Policy, new: &Policy) -> Vec<Difference> {
    let mut out = Out(Vec::new());
    for g in &old.grants {
        if !new.grants.iter().any(|n| n.id == g.id) {
            out.push(
                Change::Narrowed,
                format!("grant {} of {} removed", g.id, g.grantee),
            );
        }
    }
    for n in &new.grants {
        let Some(o) = old.grants.iter().find(|o| o.id == n.id) else {
            let datasets: Vec<&str> = n.scopes.iter().map(|s| s.dataset.as_str()).collect();
            out.push(
                Change::Widened,
                format!(
                    "grant {} added for {} on {}",
                    n.id,
                    n.grantee,
                    datasets.join(", ")
                ),
            );
            continue;
        };
        let g = format!("grant {} ({})", n.id, n.grantee);
        if o.grantee != n.grantee {
            out.push(
                Change::Changed,
                format!("{g}: grantee {} → {}", o.grantee, n.grantee),
            );
        }
        out.more_or_less(&format!("{g} starts"), o.valid_from, n.valid_from, false);
        out.more_or_less(&format!("{g} ends"), o.valid_until, n.valid_until, true);
        if o.purpose != n.purpose {
            out.push(
                Change::Changed,
                format!("{g}: purpose {} → {}", o.purpose, n.purpose),
            );
        }
        for s in &o.scopes {
            if n.scope(&s.dataset).is_none() {
                out.push(
                    Change::Narrowed,
                    format!("{g}: dataset {} removed", s.dataset),
                );
            }
        }
        for s in &n.scopes {
            let Some(os) = o.scope(&s.dataset) else {
                out.push(Change::Widened, format!("{g}: dataset {} added", s.dataset));
                continue;
            };
            let empty = BTreeSet::new();
            let columns: BTreeSet<&String> = s.columns.keys().chain(os.columns.keys()).collect();
            for c in columns {
                let (before, after) = (
                    os.columns.get(c).unwrap_or(&empty),
                    s.columns.get(c).unwrap_or(&empty),
                );
                out.uses_changed(
                    before,
                    after,
                    |u| format!("{g}: {}.{c} may now be used for {u}", s.dataset),
                    |u| format!("{g}: {}.{c} may no longer be used for {u}", s.dataset),
                );
            }
            if os.row_filter != s.row_filter {
                out.push(
                    Change::Changed,
                    format!(
                        "{g}: row filter on {} {:?} → {:?}",
                        s.dataset, os.row_filter, s.row_filter
                    ),
                );
            }
        }
        let added: Vec<_> = n
            .agg_functions
            .difference(&o.agg_functions)
            .cloned()
            .collect();
        let removed: Vec<_> = o
            .agg_functions
            .difference(&n.agg_functions)
            .cloned()
            .collect();
        if !added.is_empty() {
            out.push(
                Change::Widened,
                format!("{g}: aggregates {} allowed", added.join(", ")),
            );
        }
        if !removed.is_empty() {
            out.push(
                Change::Narrowed,
                format!("{g}: aggregates {} no longer allowed", removed.join(", ")),
            );
        }
        out.more_or_less(
            &format!("{g} min group size"),
            o.min_group_size,
            n.min_group_size,
            false,
        );
        match (&o.dp, &n.dp) {
            (Some(a), Some(b)) => {
                out.more_or_less(&format!("{g} privacy budget"), a.budget, b.budget, true);
                out.more_or_less(
                    &format!("{g} cost per query"),
                    a.per_query,
                    b.per_query,
                    true,
                );
                if a.accounting != b.accounting {
                    out.push(
                        Change::Changed,
                        format!("{g}: accounting {:?} → {:?}", a.accounting, b.accounting),
                    );
                }
                if a.window != b.window {
                    out.push(
                        Change::Changed,
                        format!("{g}: budget window {:?} → {:?}", a.window, b.window),
                    );
                }
            }
            (None, Some(_)) => {
                out.push(Change::Narrowed, format!("{g}: now under a privacy budget"))
            }
            (Some(_), None) => out.push(
                Change::Widened,
                format!("{g}: no longer under a privacy budget"),
            ),
            (None, None) => {}
        }
        if format!("{:?}", o.pricing) != format!("{:?}", n.pricing) {
            out.push(
                Change::Changed,
                format!("{g}: pricing {:?} → {:?}", o.pricing, n.pricing),
            );
        }
    }
    for (id, d) in &new.datasets {
        let Some(od) = old.datasets.get(id) else {
            out.push(Change::Widened, format!("dataset {id} added"));
            continue;
        };
        if od.level != d.level {
            let wider = d.level < od.level;
            out.push(
                if wider {
                    Change::Widened
                } else {
                    Change::Narrowed
                },
                format!("dataset {id}: level {} → {}", od.level, d.level),
            );
        }
        if let (Some(a), Some(b)) = (&od.unit, &d.unit) {
            out.more_or_less(
                &format!("dataset {id} max groups per unit"),
                a.max_groups,
                b.max_groups,
                true,
            );
            out.more_or_less(
                &format!("dataset {id} max rows per unit and group"),
                a.max_rows,
                b.max_rows,
                true,
            );
        }
        for c in &d.columns {
            if let Some(oc) = od.column(&c.name) {
                out.uses_changed(
                    &oc.allow,
                    &c.allow,
                    |u| format!("dataset {id}: column {} now allows {u}", c.name),
                    |u| format!("dataset {id}: column {} no longer allows {u}", c.name),
                );
                if oc.bounds != c.bounds {
                    out.push(
                        Change::Changed,
                        format!(
                            "dataset {id}: bounds of {} {:?} → {:?}",
                            c.name, oc.bounds, c.bounds
                        ),
                    );
                }
            }
        }
    }
    for id in old.datasets.keys() {
        if !new.datasets.contains_key(id) {
            out.push(Change::Narrowed, format!("dataset {id} removed"));
        }
    }
    for id in old.operators.keys() {
        if !new.operators.contains_key(id) {
            out.push(Change::Narrowed, format!("operator {id} removed"));
        }
    }
    for id in new.operators.keys() {
        if !old.operators.contains_key(id) {
            out.push(Change::Widened, format!("operator {id} added"));
        }
    }
    out.0
}
