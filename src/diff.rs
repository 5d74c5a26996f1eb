//! `flotilla diff`: what a change of a fleet's inputs does to every member, before it is made —
//! the objects that would be created, changed (with the fields and a unified diff of the YAML)
//! and pruned, and the policies whose verdict would change. Pure: both sides come in as data.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;

use crate::compute::plan::ObservedObject;
use crate::compute::{DesiredObject, Engine, ObjectKey};
use crate::meta::Kind;
use crate::model::{ClusterId, ObjectRef};

/// One side of a diff: the objects per member, and each policy's verdict (state, message).
#[derive(Debug, Default)]
pub struct Side {
    pub objects: BTreeMap<ClusterId, BTreeMap<ObjectKey, DesiredObject>>,
    pub policies: BTreeMap<(Kind, ObjectRef), (String, String)>,
}

impl Side {
    /// What `render` says for a fleet: the objects it would write, and the policies' verdicts.
    pub fn rendered(engine: &Engine, rendered: &crate::render::Rendered) -> Side {
        let objects = rendered
            .clusters
            .iter()
            .map(|(id, objs)| (id.clone(), objs.iter().map(|o| (o.key.clone(), o.object())).collect()))
            .collect();
        let policies = engine
            .desired
            .reports()
            .map(|r| {
                let (state, why) = r.state.describe();
                let message = if why.is_empty() { r.message.clone() } else { why };
                ((r.kind, r.at.clone()), (state.to_string(), message))
            })
            .collect();
        Side { objects, policies }
    }
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct FleetDiff {
    /// Per member with a change.
    pub clusters: BTreeMap<ClusterId, ClusterDiff>,
    pub policies: Vec<PolicyChange>,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct ClusterDiff {
    pub create: Vec<ObjectChange>,
    pub change: Vec<ObjectChange>,
    pub prune: Vec<ObjectChange>,
    /// The blast-radius guard of `run` would hold these prunes (all of them), not make them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<GuardHold>,
}

/// What the blast-radius guard would do with a member's prunes.
#[derive(Debug, Serialize, PartialEq)]
pub struct GuardHold {
    pub prunes: usize,
    /// How many it lets go at once there (`--prune-hold-threshold`, or the share of what
    /// flotilla holds there, whichever is more).
    pub allowed: usize,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ObjectChange {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// The fields whose values differ (`spec.trafficPolicy.loadBalancer…`); for a change only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
    /// A unified diff of the YAML (the whole object for a creation or a prune).
    pub diff: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct PolicyChange {
    pub kind: Kind,
    pub object: String,
    pub before: Option<Verdict>,
    pub after: Option<Verdict>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Verdict {
    pub state: String,
    pub message: String,
}

impl FleetDiff {
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty() && self.policies.is_empty()
    }
}

/// Compares two sides, member by member and policy by policy. Objects are compared by content
/// as the planner compares them (spec and flotilla's labels), so what `run` would not rewrite is
/// not a change here either.
pub fn diff(before: &Side, after: &Side) -> FleetDiff {
    let mut out = FleetDiff::default();
    let members: BTreeSet<&ClusterId> = before.objects.keys().chain(after.objects.keys()).collect();
    let empty = BTreeMap::new();
    for member in members {
        let (b, a) = (before.objects.get(member).unwrap_or(&empty), after.objects.get(member).unwrap_or(&empty));
        let mut cd = ClusterDiff::default();
        for key in b.keys().chain(a.keys()).collect::<BTreeSet<_>>() {
            match (b.get(key), a.get(key)) {
                (None, Some(new)) => cd.create.push(change(key, None, Some(new))),
                (Some(old), None) => cd.prune.push(change(key, Some(old), None)),
                (Some(old), Some(new)) if ObservedObject::new(old).digest != ObservedObject::new(new).digest => {
                    cd.change.push(change(key, Some(old), Some(new)))
                }
                _ => {}
            }
        }
        if !(cd.create.is_empty() && cd.change.is_empty() && cd.prune.is_empty()) {
            out.clusters.insert(member.clone(), cd);
        }
    }
    let keys: BTreeSet<&(Kind, ObjectRef)> = before.policies.keys().chain(after.policies.keys()).collect();
    for key in keys {
        let (b, a) = (before.policies.get(key), after.policies.get(key));
        if b != a {
            let verdict = |v: Option<&(String, String)>| {
                v.map(|(state, message)| Verdict { state: state.clone(), message: message.clone() })
            };
            out.policies.push(PolicyChange {
                kind: key.0,
                object: key.1.to_string(),
                before: verdict(b),
                after: verdict(a),
            });
        }
    }
    out
}

/// Marks the members whose prunes the blast-radius guard of `run` would hold, judged as `run`
/// judges one pass: the prunes against what flotilla holds there before (prunes of earlier
/// passes within `--prune-hold-window` are not known here).
pub fn mark_held(d: &mut FleetDiff, before: &Side, limits: &crate::controller::guard::Limits) {
    for (member, cd) in &mut d.clusters {
        let managed = before.objects.get(member).map_or(0, BTreeMap::len);
        if limits.holds(cd.prune.len(), managed) {
            cd.held = Some(GuardHold { prunes: cd.prune.len(), allowed: limits.allowed(managed) });
        }
    }
}

/// What flotilla compares of an object, as YAML: its labels of ours and its spec.
fn comparable(o: &DesiredObject) -> serde_json::Value {
    let mut v = serde_json::to_value(o).expect("objects serialise");
    if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.retain(|k, _| k == "name" || k == "namespace" || k == "labels");
    }
    v
}

fn change(key: &ObjectKey, old: Option<&DesiredObject>, new: Option<&DesiredObject>) -> ObjectChange {
    let (old, new) = (old.map(comparable), new.map(comparable));
    let text = |v: &Option<serde_json::Value>| v.as_ref().map(crate::yaml::to_yaml).unwrap_or_default();
    let mut fields = Vec::new();
    if let (Some(o), Some(n)) = (&old, &new) {
        differing_fields(o, n, String::new(), &mut fields);
    }
    let (before, after) = (text(&old), text(&new));
    let diff = similar::TextDiff::from_lines(&before, &after)
        .unified_diff()
        .context_radius(3)
        .header("before", "after")
        .to_string();
    ObjectChange { kind: key.kind, namespace: key.namespace.to_string(), name: key.name.to_string(), fields, diff }
}

/// The paths of the leaves whose values differ between two JSON values.
fn differing_fields(a: &serde_json::Value, b: &serde_json::Value, path: String, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys()).collect::<BTreeSet<_>>() {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => differing_fields(va, vb, p, out),
                    _ => out.push(p),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            for i in 0..x.len().max(y.len()) {
                let p = format!("{path}[{i}]");
                match (x.get(i), y.get(i)) {
                    (Some(va), Some(vb)) => differing_fields(va, vb, p, out),
                    _ => out.push(p),
                }
            }
        }
        (x, y) if x != y => out.push(path),
        _ => {}
    }
}

/// The diff for people: per member, what would be created (+), changed (~) and pruned (-), then
/// the policies whose verdict would change.
pub fn to_text(d: &FleetDiff) -> String {
    let mut out = String::new();
    if d.is_empty() {
        out.push_str("No changes: every member would keep what it has.\n");
        return out;
    }
    for (member, cd) in &d.clusters {
        let _ = writeln!(
            out,
            "# cluster {member}: {} to create, {} to change, {} to prune",
            cd.create.len(),
            cd.change.len(),
            cd.prune.len()
        );
        if let Some(h) = &cd.held {
            let _ = writeln!(
                out,
                "! the blast-radius guard would hold these {} prunes (more than the {} it lets go at once here): run writes the rest and waits for flotilla.io/release-prunes",
                h.prunes, h.allowed
            );
        }
        for (sign, verb, list) in [("+", "create", &cd.create), ("~", "change", &cd.change), ("-", "prune", &cd.prune)]
        {
            for c in list {
                let _ = writeln!(out, "{sign} {verb} {} {}/{}", c.kind, c.namespace, c.name);
                if !c.fields.is_empty() {
                    let _ = writeln!(out, "    fields: {}", c.fields.join(", "));
                }
                if verb == "change" {
                    for line in c.diff.lines() {
                        let _ = writeln!(out, "    {line}");
                    }
                }
            }
        }
    }
    if !d.policies.is_empty() {
        let _ = writeln!(out, "# policies");
        for p in &d.policies {
            let show = |v: &Option<Verdict>| match v {
                None => "(none)".to_string(),
                Some(v) if v.message.is_empty() => v.state.clone(),
                Some(v) => format!("{} ({})", v.state, v.message),
            };
            let _ = writeln!(out, "~ {} {}: {} → {}", p.kind, p.object, show(&p.before), show(&p.after));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prunes_past_the_guard_s_limits_are_marked_held() {
        let prune = |i: usize| ObjectChange {
            kind: Kind::ServiceEntry,
            namespace: "admiral-sync".into(),
            name: format!("se-{i}"),
            fields: Vec::new(),
            diff: String::new(),
        };
        let cluster = |n: usize| ClusterDiff { prune: (0..n).map(prune).collect(), ..Default::default() };
        let mut d = FleetDiff::default();
        d.clusters.insert("big".into(), cluster(6));
        d.clusters.insert("small".into(), cluster(4));
        let mut before = Side::default();
        // 6 of 40 objects: more than 5 and more than a tenth (4): held. 4 of 100: not.
        let objects = |n: usize| -> BTreeMap<ObjectKey, DesiredObject> {
            (0..n)
                .map(|i| {
                    let key = ObjectKey::new(Kind::ServiceEntry, "admiral-sync", &format!("se-{i}"));
                    (key, DesiredObject::ServiceEntry(Default::default()))
                })
                .collect()
        };
        before.objects.insert("big".into(), objects(40));
        before.objects.insert("small".into(), objects(100));
        let limits =
            crate::controller::guard::Limits { threshold: 5, share: 0.1, window: std::time::Duration::from_secs(600) };
        mark_held(&mut d, &before, &limits);
        assert_eq!(d.clusters["big"].held, Some(GuardHold { prunes: 6, allowed: 5 }));
        assert_eq!(d.clusters["small"].held, None);
        assert!(to_text(&d).contains("! the blast-radius guard would hold these 6 prunes"), "{}", to_text(&d));
        // Off: nothing is held.
        let mut d2 = FleetDiff::default();
        d2.clusters.insert("big".into(), cluster(6));
        mark_held(&mut d2, &before, &crate::controller::guard::Limits { threshold: 0, ..limits });
        assert_eq!(d2.clusters["big"].held, None);
    }

    #[test]
    fn fields_are_the_leaves_that_differ() {
        let a = json!({"spec": {"to": {"a": 80, "b": 20}, "list": [1, 2], "same": true}});
        let b = json!({"spec": {"to": {"a": 30, "b": 70}, "list": [1], "same": true, "new": 1}});
        let mut fields = Vec::new();
        differing_fields(&a, &b, String::new(), &mut fields);
        assert_eq!(fields, ["spec.list[1]", "spec.new", "spec.to.a", "spec.to.b"]);
    }
}
