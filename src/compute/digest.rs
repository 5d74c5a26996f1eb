//! A content digest of a written object: what the planner compares instead of the objects.
//!
//! The digest covers the kind, the spec as serde serialises it for server-side apply (the same
//! fields, the same skipped empties), and the values of the labels flotilla sets. Two objects
//! with the same digest would be written with the same content, so an observed object whose
//! digest equals the desired one needs no write. It is computed once per object, when a desired
//! object is built and when an observed one is read, straight from the typed spec: serde walks
//! the spec into a compact binary form (no text, no escaping), which is hashed in one call
//! (hashing each token on its own costs more than the copy). SipHash-1-3 with 128 bits makes an
//! accidental match between two different contents (about 2⁻¹²⁸ per comparison) far less likely
//! than any other failure.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hash::Hasher;

use serde::Serialize;
use serde::ser;
use siphasher::sip128::{Hasher128, SipHasher13};

use super::{DesiredObject, DesiredSpec};
use crate::meta::{Kind, LABEL_ENV, LABEL_IDENTITY, LABEL_INSTANCE, LABEL_MANAGED_BY};

/// The labels flotilla sets on everything it writes; only their values count in a digest.
const OUR_LABELS: [&str; 4] = [LABEL_MANAGED_BY, LABEL_IDENTITY, LABEL_ENV, LABEL_INSTANCE];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Digest(u128);

impl Digest {
    /// The digest of an object as found in a cluster (or anywhere whole).
    pub fn of(object: &DesiredObject) -> Digest {
        let labels = object.meta().labels.as_ref();
        match object {
            DesiredObject::DestinationRule(o) => Digest::compute(Kind::DestinationRule, &o.spec, labels),
            DesiredObject::ServiceEntry(o) => Digest::compute(Kind::ServiceEntry, &o.spec, labels),
            DesiredObject::Sidecar(o) => Digest::compute(Kind::Sidecar, &o.spec, labels),
            DesiredObject::VirtualService(o) => Digest::compute(Kind::VirtualService, &o.spec, labels),
        }
    }

    /// The digest of a desired object from its parts: equal to `of` its whole object.
    pub fn of_spec(spec: &DesiredSpec, labels: Option<&BTreeMap<String, String>>) -> Digest {
        match spec {
            DesiredSpec::DestinationRule(spec) => Digest::compute(Kind::DestinationRule, spec, labels),
            DesiredSpec::ServiceEntry(spec) => Digest::compute(Kind::ServiceEntry, spec, labels),
            DesiredSpec::Sidecar(spec) => Digest::compute(Kind::Sidecar, spec, labels),
            DesiredSpec::VirtualService(spec) => Digest::compute(Kind::VirtualService, spec, labels),
        }
    }

    fn compute(kind: Kind, spec: &impl Serialize, labels: Option<&BTreeMap<String, String>>) -> Digest {
        thread_local! {
            static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        BUFFER.with_borrow_mut(|buffer| {
            buffer.clear();
            buffer.push(kind as u8);
            spec.serialize(Feed(buffer)).expect("writing a spec into memory cannot fail");
            for key in OUR_LABELS {
                feed_str(buffer, labels.and_then(|l| l.get(key)).map(String::as_str));
            }
            let mut h = SipHasher13::new();
            h.write(buffer);
            Digest(h.finish128().as_u128())
        })
    }
}

/// What serde says of a value, as bytes that differ whenever the values differ: every token
/// starts with a tag byte, strings carry their lengths, lists and maps an end mark, and struct
/// fields their names (a field skipped because it is empty is simply absent).
struct Feed<'b>(&'b mut Vec<u8>);

mod tag {
    pub const NONE: u8 = 0;
    pub const SOME: u8 = 1;
    pub const BOOL: u8 = 2;
    pub const INT: u8 = 3;
    pub const UINT: u8 = 4;
    pub const FLOAT: u8 = 5;
    pub const STR: u8 = 6;
    pub const BYTES: u8 = 7;
    pub const UNIT: u8 = 8;
    pub const VARIANT: u8 = 9;
    pub const SEQ: u8 = 10;
    pub const MAP: u8 = 11;
    pub const STRUCT: u8 = 12;
    pub const ITEM: u8 = 13;
    pub const END: u8 = 14;
}

fn feed_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(tag::NONE),
        Some(s) => {
            out.push(tag::STR);
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

type Error = serde::de::value::Error;

impl<'b> Feed<'b> {
    fn tag(&mut self, t: u8) -> Result<(), Error> {
        self.0.push(t);
        Ok(())
    }

    fn word(&mut self, t: u8, word: u64) -> Result<(), Error> {
        self.0.push(t);
        self.0.extend_from_slice(&word.to_le_bytes());
        Ok(())
    }

    fn variant(&mut self, name: &str, index: u32) {
        self.0.push(tag::VARIANT);
        self.0.extend_from_slice(&index.to_le_bytes());
        feed_str(self.0, Some(name));
    }

    fn again(&mut self) -> Feed<'_> {
        Feed(&mut *self.0)
    }
}

impl<'b> ser::Serializer for Feed<'b> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn serialize_bool(mut self, v: bool) -> Result<(), Error> {
        self.tag(tag::BOOL)?;
        self.0.push(u8::from(v));
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), Error> {
        self.serialize_i64(i64::from(v))
    }
    fn serialize_i16(self, v: i16) -> Result<(), Error> {
        self.serialize_i64(i64::from(v))
    }
    fn serialize_i32(self, v: i32) -> Result<(), Error> {
        self.serialize_i64(i64::from(v))
    }
    fn serialize_i64(mut self, v: i64) -> Result<(), Error> {
        self.word(tag::INT, v as u64)
    }
    fn serialize_u8(self, v: u8) -> Result<(), Error> {
        self.serialize_u64(u64::from(v))
    }
    fn serialize_u16(self, v: u16) -> Result<(), Error> {
        self.serialize_u64(u64::from(v))
    }
    fn serialize_u32(self, v: u32) -> Result<(), Error> {
        self.serialize_u64(u64::from(v))
    }
    fn serialize_u64(mut self, v: u64) -> Result<(), Error> {
        self.word(tag::UINT, v)
    }
    fn serialize_f32(self, v: f32) -> Result<(), Error> {
        self.serialize_f64(f64::from(v))
    }
    fn serialize_f64(mut self, v: f64) -> Result<(), Error> {
        self.word(tag::FLOAT, v.to_bits())
    }
    fn serialize_char(self, v: char) -> Result<(), Error> {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }
    fn serialize_str(self, v: &str) -> Result<(), Error> {
        feed_str(self.0, Some(v));
        Ok(())
    }
    fn serialize_bytes(mut self, v: &[u8]) -> Result<(), Error> {
        self.word(tag::BYTES, v.len() as u64)?;
        self.0.extend_from_slice(v);
        Ok(())
    }
    fn serialize_none(mut self) -> Result<(), Error> {
        self.tag(tag::NONE)
    }
    fn serialize_some<T: ?Sized + Serialize>(mut self, value: &T) -> Result<(), Error> {
        self.tag(tag::SOME)?;
        value.serialize(self)
    }
    fn serialize_unit(mut self) -> Result<(), Error> {
        self.tag(tag::UNIT)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Error> {
        self.serialize_unit()
    }
    fn serialize_unit_variant(mut self, _name: &'static str, index: u32, variant: &'static str) -> Result<(), Error> {
        self.variant(variant, index);
        Ok(())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(self, _name: &'static str, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        mut self,
        _name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.variant(variant, index);
        value.serialize(self)
    }
    fn serialize_seq(mut self, _len: Option<usize>) -> Result<Self, Error> {
        self.tag(tag::SEQ)?;
        Ok(self)
    }
    fn serialize_tuple(self, len: usize) -> Result<Self, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Self, Error> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        mut self,
        _name: &'static str,
        index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self, Error> {
        self.variant(variant, index);
        self.tag(tag::SEQ)?;
        Ok(self)
    }
    fn serialize_map(mut self, _len: Option<usize>) -> Result<Self, Error> {
        self.tag(tag::MAP)?;
        Ok(self)
    }
    fn serialize_struct(mut self, _name: &'static str, _len: usize) -> Result<Self, Error> {
        self.tag(tag::STRUCT)?;
        Ok(self)
    }
    fn serialize_struct_variant(
        mut self,
        _name: &'static str,
        index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self, Error> {
        self.variant(variant, index);
        self.tag(tag::STRUCT)?;
        Ok(self)
    }
}

/// Lists and maps: each element (and each key) marked, then an end mark, so that where one
/// list ends and the next token starts is never in doubt.
impl Feed<'_> {
    fn item<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), Error> {
        self.0.push(tag::ITEM);
        value.serialize(self.again())
    }
    fn field<T: ?Sized + Serialize>(&mut self, key: &'static str, value: &T) -> Result<(), Error> {
        feed_str(self.0, Some(key));
        value.serialize(self.again())
    }
    fn end(mut self) -> Result<(), Error> {
        self.tag(tag::END)
    }
}

/// Lists (each element an item) and structs (each field by name) all feed the same way.
macro_rules! compound {
    ($($kind:ident: $trait:ident::$method:ident($($key:ident)?)),* $(,)?) => {$(
        impl ser::$trait for Feed<'_> {
            type Ok = ();
            type Error = Error;
            fn $method<T: ?Sized + Serialize>(&mut self, $($key: &'static str,)? value: &T) -> Result<(), Error> {
                self.$kind($($key,)? value)
            }
            fn end(self) -> Result<(), Error> {
                Feed::end(self)
            }
        }
    )*};
}

compound!(
    item: SerializeSeq::serialize_element(),
    item: SerializeTuple::serialize_element(),
    item: SerializeTupleStruct::serialize_field(),
    item: SerializeTupleVariant::serialize_field(),
    field: SerializeStruct::serialize_field(key),
    field: SerializeStructVariant::serialize_field(key),
);

impl ser::SerializeMap for Feed<'_> {
    type Ok = ();
    type Error = Error;
    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> Result<(), Error> {
        self.item(key)
    }
    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> Result<(), Error> {
        value.serialize(self.again())
    }
    fn end(self) -> Result<(), Error> {
        Feed::end(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::istio::{ServiceEntry, ServiceEntrySpec, WorkloadEntry};
    use proptest::prelude::*;

    fn entry(hosts: Vec<String>, addresses: Vec<String>, endpoints: Vec<(String, Option<u32>)>) -> DesiredObject {
        let endpoints = endpoints
            .into_iter()
            .map(|(address, weight)| WorkloadEntry { address, weight, ..Default::default() })
            .collect();
        let spec = ServiceEntrySpec { hosts, addresses, endpoints, ..Default::default() };
        DesiredObject::ServiceEntry(ServiceEntry { metadata: Default::default(), spec })
    }

    proptest! {
        /// Two specs get the same digest exactly when they serialise to the same JSON: the
        /// digest sees what server-side apply would send, no more and no less. Strings are
        /// drawn from few letters so that lists often differ only in where they split.
        #[test]
        fn the_same_digest_exactly_when_the_same_json(
            a in (prop::collection::vec("[ab]{0,2}", 0..3), prop::collection::vec("[ab]{0,2}", 0..2), prop::collection::vec(("[ab]{0,2}", prop::option::of(0u32..2)), 0..2)),
            b in (prop::collection::vec("[ab]{0,2}", 0..3), prop::collection::vec("[ab]{0,2}", 0..2), prop::collection::vec(("[ab]{0,2}", prop::option::of(0u32..2)), 0..2)),
        ) {
            let (a, b) = (entry(a.0, a.1, a.2), entry(b.0, b.1, b.2));
            prop_assert_eq!(Digest::of(&a) == Digest::of(&b), a.spec_json() == b.spec_json());
        }
    }

    /// A desired object's digest is made from its parts and an observed one's from the whole
    /// object: they must agree, or every object would be written again on every pass. And the
    /// parts serialise exactly as the whole object, which is what is written and printed.
    #[test]
    fn a_desired_object_and_its_whole_form_agree() {
        use super::super::Desired;
        use crate::istio::{DestinationRuleSpec, EgressListener, SidecarSpec};
        use crate::meta::managed_labels;
        use std::sync::Arc;

        let labels = Arc::new(managed_labels("greeting", "prod", "flotilla"));
        let specs = [
            DesiredSpec::ServiceEntry(ServiceEntrySpec {
                hosts: vec!["prod.greeting.global".into()],
                endpoints: vec![WorkloadEntry { address: "10.0.0.1".into(), ..Default::default() }],
                ..Default::default()
            }),
            DesiredSpec::DestinationRule(DestinationRuleSpec {
                host: "prod.greeting.global".into(),
                ..Default::default()
            }),
            DesiredSpec::Sidecar(SidecarSpec {
                egress: vec![EgressListener { hosts: vec!["./*".into()] }],
                ..Default::default()
            }),
        ];
        for spec in specs {
            let desired = Desired::new("admiral-sync", "prod.greeting.global-x", labels.clone(), spec);
            let whole = desired.object();
            assert_eq!(desired.digest, Digest::of(&whole), "{}", desired.key);
            assert_eq!(
                serde_json::to_string(&desired).unwrap(),
                serde_json::to_string(&whole).unwrap(),
                "{}",
                desired.key
            );
            assert_eq!(whole.key(), desired.key);
        }
        // The labels count: the same spec for another identity is another content.
        let other = Desired::new(
            "admiral-sync",
            "x",
            Arc::new(managed_labels("other", "prod", "flotilla")),
            DesiredSpec::Sidecar(SidecarSpec::default()),
        );
        let same = Desired::new("admiral-sync", "x", labels, DesiredSpec::Sidecar(SidecarSpec::default()));
        assert_ne!(other.digest, same.digest);
    }
}
