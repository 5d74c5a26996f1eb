//! Which of several competing policies wins.

use std::cmp::Reverse;

use crate::model::Policy;

/// Orders competing policies best first: highest priority (when it counts), newest, then name,
/// namespace and cluster so that the order is total and never depends on input order.
pub fn rank<S>(candidates: &mut [&Policy<S>], use_priority: bool) {
    candidates.sort_by(|a, b| {
        let pa = if use_priority { a.priority } else { 0 };
        let pb = if use_priority { b.priority } else { 0 };
        Reverse(pa)
            .cmp(&Reverse(pb))
            .then_with(|| Reverse(a.created).cmp(&Reverse(b.created)))
            .then_with(|| a.at.name.cmp(&b.at.name))
            .then_with(|| a.at.namespace.cmp(&b.at.namespace))
            .then_with(|| a.at.cluster.cmp(&b.at.cluster))
    });
}
