//! The canonical form of a policy: what its identity (hash) is computed from.
//!
//! Order carries no meaning in the lists of datasets, columns, operators,
//! tokens, grants, scopes, tags and uses, so the canonical form sorts them;
//! value domains keep their order (it is the order keys are released in).
//! Comments, whitespace and key order disappear in the TOML serialization.

use sha2::{Digest, Sha256};

use crate::raw::RawPolicy;

fn sorted<T: Ord + Clone>(v: &mut Vec<T>) {
    v.sort();
    v.dedup();
}

/// The canonical form of a raw policy.
pub fn canonical(raw: &RawPolicy) -> RawPolicy {
    let mut r = raw.clone();
    r.levels
        .sort_by(|a, b| (a.rank, &a.name).cmp(&(b.rank, &b.name)));
    for l in &mut r.levels {
        sorted(&mut l.purposes);
        if let Some(a) = &mut l.allow {
            sorted(a);
        }
    }
    r.datasets.sort_by(|a, b| a.id.cmp(&b.id));
    for d in &mut r.datasets {
        d.columns.sort_by(|a, b| a.name.cmp(&b.name));
        for c in &mut d.columns {
            sorted(&mut c.tags);
            sorted(&mut c.allow);
        }
        d.foreign_keys
            .sort_by(|a, b| (&a.column, &a.references).cmp(&(&b.column, &b.references)));
    }
    r.operators.sort_by(|a, b| a.id.cmp(&b.id));
    for o in &mut r.operators {
        sorted(&mut o.tokens);
    }
    r.grants.sort_by(|a, b| a.id.cmp(&b.id));
    for g in &mut r.grants {
        g.scopes.sort_by(|a, b| a.dataset.cmp(&b.dataset));
        for s in &mut g.scopes {
            for uses in s.columns.values_mut() {
                sorted(uses);
            }
        }
        sorted(&mut g.products);
        if let Some(l) = &mut g.limits
            && let Some(f) = &mut l.agg_functions
        {
            for x in f.iter_mut() {
                *x = x.to_ascii_uppercase();
            }
            sorted(f);
        }
    }
    for e in &mut r.escalations {
        sorted(&mut e.datasets);
    }
    r.escalations
        .sort_by(|a, b| (&a.datasets, &a.level).cmp(&(&b.datasets, &b.level)));
    r.truncated_joins
        .sort_by(|a, b| (&a.datasets, &a.on).cmp(&(&b.datasets, &b.on)));
    r
}

/// The canonical TOML text of a raw policy.
pub fn canonical_text(raw: &RawPolicy) -> String {
    toml::to_string(&canonical(raw)).unwrap_or_default()
}

/// SHA-256 (hex) of the canonical text: the policy's identity.
pub fn canonical_hash(raw: &RawPolicy) -> String {
    hex::encode(Sha256::digest(canonical_text(raw).as_bytes()))
}
