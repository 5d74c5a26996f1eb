//! What compute produces, as plain data: object keys, the desired objects with their digests,
//! diagnostics, and the reports on policies that become their statuses.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::istio::{
    DestinationRule, DestinationRuleSpec, ServiceEntry, ServiceEntrySpec, Sidecar, SidecarSpec, VirtualService,
    VirtualServiceSpec,
};
use crate::meta::Kind;
use crate::model::{ClusterId, ClusterIdx, ObjectRef, Policy};

use super::digest::Digest;

/// Identifies one written object inside one cluster. The name is shared (`Arc<str>`): one
/// object's key is held by every cluster it is desired in and by every plan that names it.
///
/// Keys order by (kind, namespace, name). The desired and observed maps are searched by key
/// hundreds of thousands of times per full compute, and reading names that live elsewhere in
/// memory is what such a search waits on; so a key carries the first 16 bytes of its name, and
/// namespaces are interned, which settles most comparisons without reading either string.
#[derive(Clone, Debug)]
pub struct ObjectKey {
    pub kind: Kind,
    /// Interned: one copy per namespace for the life of the process. A counted reference here
    /// would be one counter that every thread updates for every key it copies.
    pub namespace: &'static str,
    pub name: Arc<str>,
    /// The name's first 16 bytes, big-endian and zero-padded: ordering these orders the names
    /// the same way (object names hold no NUL), up to a tie that the full names settle.
    name_head: [u64; 2],
}

impl ObjectKey {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        let mut head = [0u8; 16];
        let n = name.len().min(16);
        head[..n].copy_from_slice(&name.as_bytes()[..n]);
        let name_head = [
            u64::from_be_bytes(head[..8].try_into().expect("8 bytes")),
            u64::from_be_bytes(head[8..].try_into().expect("8 bytes")),
        ];
        ObjectKey { kind, namespace: interned_namespace(namespace), name: name.into(), name_head }
    }
}

/// The one copy of `namespace`. Namespaces that hold our kinds are few (the sync namespace and
/// those with Sidecars, at most 63 bytes each), so keeping every one ever seen costs little, and
/// lets comparing two keys' namespaces be mostly a pointer comparison.
fn interned_namespace(namespace: &str) -> &'static str {
    thread_local! {
        // Most objects go to the sync namespace: the last one answers without taking the lock.
        static LAST: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
    }
    let last = LAST.get();
    if last == namespace {
        return last;
    }
    static NAMESPACES: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut seen = NAMESPACES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let interned = match seen.get(namespace) {
        Some(interned) => interned,
        None => {
            let interned: &'static str = Box::leak(namespace.into());
            seen.insert(interned);
            interned
        }
    };
    LAST.set(interned);
    interned
}

/// What an `ObjectKey` starts with, copied out: ordering these orders their keys the same way,
/// up to ties that the whole keys settle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct KeyHead(Kind, &'static str, [u64; 2]);

impl ObjectKey {
    pub(super) fn head(&self) -> KeyHead {
        KeyHead(self.kind, self.namespace, self.name_head)
    }
}

fn cmp_shared(a: &Arc<str>, b: &Arc<str>) -> std::cmp::Ordering {
    if Arc::ptr_eq(a, b) { std::cmp::Ordering::Equal } else { a.cmp(b) }
}

fn cmp_interned(a: &'static str, b: &'static str) -> std::cmp::Ordering {
    if std::ptr::eq(a, b) { std::cmp::Ordering::Equal } else { a.cmp(b) }
}

impl Ord for ObjectKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.kind
            .cmp(&other.kind)
            .then_with(|| cmp_interned(self.namespace, other.namespace))
            .then_with(|| self.name_head.cmp(&other.name_head))
            .then_with(|| cmp_shared(&self.name, &other.name))
    }
}

impl PartialOrd for ObjectKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for ObjectKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for ObjectKey {}

impl std::hash::Hash for ObjectKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Interned: equal namespaces are one copy, so its address stands for it.
        (self.kind, self.namespace.as_ptr(), &*self.name).hash(state);
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A whole object of a kind flotilla writes: as read from a cluster, or a desired one put
/// together to be written (`Desired::object`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
// Whole objects live briefly (read, digested, dropped; or written), so the size difference
// between variants costs little.
#[allow(clippy::large_enum_variant)]
pub enum DesiredObject {
    DestinationRule(DestinationRule),
    ServiceEntry(ServiceEntry),
    Sidecar(Sidecar),
    VirtualService(VirtualService),
}

impl DesiredObject {
    pub fn kind(&self) -> Kind {
        match self {
            DesiredObject::DestinationRule(_) => Kind::DestinationRule,
            DesiredObject::ServiceEntry(_) => Kind::ServiceEntry,
            DesiredObject::Sidecar(_) => Kind::Sidecar,
            DesiredObject::VirtualService(_) => Kind::VirtualService,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            DesiredObject::DestinationRule(o) => &o.metadata,
            DesiredObject::ServiceEntry(o) => &o.metadata,
            DesiredObject::Sidecar(o) => &o.metadata,
            DesiredObject::VirtualService(o) => &o.metadata,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let m = self.meta();
        ObjectKey::new(self.kind(), m.namespace.as_deref().unwrap_or_default(), m.name.as_deref().unwrap_or_default())
    }

    /// The spec as JSON: what the planner compares with what a cluster holds.
    pub fn spec_json(&self) -> serde_json::Value {
        let spec = match self {
            DesiredObject::DestinationRule(o) => serde_json::to_value(&o.spec),
            DesiredObject::ServiceEntry(o) => serde_json::to_value(&o.spec),
            DesiredObject::Sidecar(o) => serde_json::to_value(&o.spec),
            DesiredObject::VirtualService(o) => serde_json::to_value(&o.spec),
        };
        spec.expect("serialising a spec to JSON")
    }
}

/// The labels flotilla sets on what it writes for one identity and env (`meta::managed_labels`):
/// built once per identity and env and shared by its ServiceEntries and DestinationRules (a
/// Sidecar, already shared by the members it goes to, builds its own).
pub type ManagedLabels = Arc<BTreeMap<String, String>>;

/// What a desired object says, by kind: its spec. Name and namespace are in its key, the
/// labels shared; the whole typed object is put together only to be written or shown.
#[derive(Clone, Debug, PartialEq)]
// A DestinationRule's spec is the largest; boxing it would cost an allocation per rule to save
// some 280 bytes per ServiceEntry and Sidecar, which are a few per host.
#[allow(clippy::large_enum_variant)]
pub enum DesiredSpec {
    DestinationRule(DestinationRuleSpec),
    ServiceEntry(ServiceEntrySpec),
    Sidecar(SidecarSpec),
    VirtualService(VirtualServiceSpec),
}

impl DesiredSpec {
    pub fn kind(&self) -> Kind {
        match self {
            DesiredSpec::DestinationRule(_) => Kind::DestinationRule,
            DesiredSpec::ServiceEntry(_) => Kind::ServiceEntry,
            DesiredSpec::Sidecar(_) => Kind::Sidecar,
            DesiredSpec::VirtualService(_) => Kind::VirtualService,
        }
    }
}

/// A desired object made of shared parts, with what is derived from it once, when it is built:
/// its key and its content digest (what the planner compares). Shared behind `Arc` by every
/// cluster that wants it. A full compute builds some 30,000 of these at 100 × 5,000; a
/// Kubernetes `ObjectMeta` of its own (name, namespace and three labels: nine allocations) was a
/// third of what building them allocated.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub key: ObjectKey,
    pub digest: Digest,
    pub labels: ManagedLabels,
    pub spec: DesiredSpec,
}

impl Desired {
    pub fn new(namespace: &str, name: &str, labels: ManagedLabels, spec: DesiredSpec) -> Self {
        let key = ObjectKey::new(spec.kind(), namespace, name);
        let digest = Digest::of_spec(&spec, Some(&labels));
        Desired { key, digest, labels, spec }
    }

    /// The parts of a whole object (no labels become an empty set of them): for tests that start
    /// from typed objects.
    #[cfg(test)]
    pub fn from_object(object: DesiredObject) -> Self {
        let meta = object.meta();
        let (namespace, name) = (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default());
        let labels = Arc::new(meta.labels.clone().unwrap_or_default());
        let spec = match object {
            DesiredObject::DestinationRule(o) => DesiredSpec::DestinationRule(o.spec),
            DesiredObject::ServiceEntry(o) => DesiredSpec::ServiceEntry(o.spec),
            DesiredObject::Sidecar(o) => DesiredSpec::Sidecar(o.spec),
            DesiredObject::VirtualService(o) => DesiredSpec::VirtualService(o.spec),
        };
        Desired::new(&namespace, &name, labels, spec)
    }

    /// The whole typed object, as it is written: for the writer and for comparisons.
    pub fn object(&self) -> DesiredObject {
        let metadata = ObjectMeta {
            name: Some(self.key.name.to_string()),
            namespace: Some(self.key.namespace.to_string()),
            labels: Some((*self.labels).clone()),
            ..Default::default()
        };
        match &self.spec {
            DesiredSpec::DestinationRule(spec) => {
                DesiredObject::DestinationRule(DestinationRule { metadata, spec: spec.clone() })
            }
            DesiredSpec::ServiceEntry(spec) => {
                DesiredObject::ServiceEntry(ServiceEntry { metadata, spec: spec.clone() })
            }
            DesiredSpec::Sidecar(spec) => DesiredObject::Sidecar(Sidecar { metadata, spec: spec.clone() }),
            DesiredSpec::VirtualService(spec) => {
                DesiredObject::VirtualService(VirtualService { metadata, spec: spec.clone() })
            }
        }
    }
}

/// Serialised exactly as `object()` is (the order and names of the fields of a custom
/// resource and of its `ObjectMeta`), without putting the object together: `render` prints
/// every object once per member it goes to.
impl Serialize for Desired {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use kube::Resource;
        use serde::ser::SerializeStruct;

        fn whole<S: serde::Serializer, K: Resource<DynamicType = ()>>(
            serializer: S,
            name: &'static str,
            desired: &Desired,
            spec: &impl Serialize,
        ) -> Result<S::Ok, S::Error> {
            let mut object = serializer.serialize_struct(name, 4)?;
            object.serialize_field("apiVersion", &K::api_version(&()))?;
            object.serialize_field("kind", &K::kind(&()))?;
            object.serialize_field("metadata", &Metadata(desired))?;
            object.serialize_field("spec", spec)?;
            object.end()
        }

        /// The fields of `ObjectMeta` a desired object sets, in the order `ObjectMeta` writes them.
        struct Metadata<'a>(&'a Desired);
        impl Serialize for Metadata<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut meta = serializer.serialize_struct("ObjectMeta", 3)?;
                meta.serialize_field("labels", &*self.0.labels)?;
                meta.serialize_field("name", &*self.0.key.name)?;
                meta.serialize_field("namespace", self.0.key.namespace)?;
                meta.end()
            }
        }

        match &self.spec {
            DesiredSpec::DestinationRule(spec) => {
                whole::<S, DestinationRule>(serializer, "DestinationRule", self, spec)
            }
            DesiredSpec::ServiceEntry(spec) => whole::<S, ServiceEntry>(serializer, "ServiceEntry", self, spec),
            DesiredSpec::Sidecar(spec) => whole::<S, Sidecar>(serializer, "Sidecar", self, spec),
            DesiredSpec::VirtualService(spec) => whole::<S, VirtualService>(serializer, "VirtualService", self, spec),
        }
    }
}

/// One object of an identity's and the members it is desired in. Members that stand in the same
/// place (a remote ServiceEntry is the same for every member without a local endpoint) share one
/// object, so a host's objects are a handful however large the fleet.
#[derive(Clone, Debug, PartialEq)]
pub struct Placed {
    pub desired: Arc<Desired>,
    /// Ascending, without duplicates.
    pub clusters: Vec<ClusterIdx>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// The GlobalTrafficPolicy in force for one env of an identity: what Admiral's read API serves
/// (`/identity/{id}/globaltrafficpolicy`).
#[derive(Clone, Debug)]
pub struct PolicyInForce {
    pub env: String,
    pub at: ObjectRef,
    pub generation: Option<i64>,
    pub spec: crate::crd::GlobalTrafficPolicySpec,
}

/// A lasting problem with someone else's object in a member, told where its owners look: a
/// Warning Event on it (the runtime announces each once while it lasts).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Notice {
    pub cluster: String,
    /// (apiVersion, kind) of the object.
    pub api_version: &'static str,
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub reason: &'static str,
    pub note: String,
}

/// Something wrong or noteworthy about the input, naming the object it is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    pub severity: Severity,
    pub cluster: Option<String>,
    pub object: String,
    pub message: String,
}

impl Diagnostic {
    pub fn warning(cluster: Option<&str>, object: String, message: String) -> Self {
        Diagnostic { severity: Severity::Warning, cluster: cluster.map(str::to_string), object, message }
    }
    pub fn error(cluster: Option<&str>, object: String, message: String) -> Self {
        Diagnostic { severity: Severity::Error, cluster: cluster.map(str::to_string), object, message }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match &self.cluster {
            Some(c) => write!(f, "{sev}: cluster {c}: {}: {}", self.object, self.message),
            None => write!(f, "{sev}: {}: {}", self.object, self.message),
        }
    }
}

/// What happened to one policy: the basis of its status conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyState {
    /// In force.
    Ready,
    /// Lost to another policy for the same identity+env (the winner).
    Conflict(ObjectRef),
    /// Rejected, with the reason; a previous valid spec may still be in force.
    Invalid(String),
    /// Valid, but matches no workload.
    NotApplied(String),
}

impl PolicyState {
    /// The state's name (the status field `state`) and what to tell a user about it: the one
    /// wording shared by the status, `render`'s report and `/debug`.
    pub fn describe(&self) -> (&'static str, String) {
        match self {
            PolicyState::Ready => ("Ready", String::new()),
            PolicyState::Conflict(winner) => ("Conflict", format!("not applied: {winner} takes precedence")),
            PolicyState::Invalid(reason) => ("Invalid", reason.clone()),
            PolicyState::NotApplied(reason) => ("NotApplied", format!("not applied: {reason}")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyReport {
    pub kind: Kind,
    pub at: ObjectRef,
    pub generation: Option<i64>,
    pub state: PolicyState,
    /// Per target cluster, the hosts written there because of this policy (one set shared by
    /// the clusters that get the same hosts).
    pub clusters: BTreeMap<ClusterId, Arc<BTreeSet<String>>>,
    pub message: String,
    /// A Dependency's own object besides its hosts': the Sidecar it shapes in its source's
    /// members (by name), whose write errors its status names.
    pub sidecar: Option<String>,
}

impl PolicyReport {
    pub fn new<S>(kind: Kind, p: &Policy<S>, state: PolicyState) -> Self {
        PolicyReport {
            kind,
            at: p.at.clone(),
            generation: p.generation,
            state,
            clusters: BTreeMap::new(),
            message: String::new(),
            sidecar: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind(n: u8) -> Kind {
        Kind::OUTPUTS[usize::from(n) % Kind::OUTPUTS.len()]
    }

    proptest! {
        /// The shortcuts in `ObjectKey`'s comparison (shared namespaces, the name's first 16
        /// bytes) order keys exactly as the (kind, namespace, name) strings do. Names share long
        /// prefixes on purpose, so that the 16 bytes often tie.
        #[test]
        fn object_keys_order_like_their_strings(
            a in (0u8..3, "[a-c]{0,3}", "(stage\\.svc0000|x)[0-9a-c.-]{0,6}"),
            b in (0u8..3, "[a-c]{0,3}", "(stage\\.svc0000|x)[0-9a-c.-]{0,6}"),
        ) {
            let ka = ObjectKey::new(kind(a.0), &a.1, &a.2);
            let kb = ObjectKey::new(kind(b.0), &b.1, &b.2);
            let strings = (kind(a.0), a.1.as_str(), a.2.as_str()).cmp(&(kind(b.0), b.1.as_str(), b.2.as_str()));
            prop_assert_eq!(ka.cmp(&kb), strings);
            prop_assert_eq!(ka == kb, strings.is_eq());
            prop_assert_eq!(ka.clone().cmp(&ka), std::cmp::Ordering::Equal);
        }
    }
}
