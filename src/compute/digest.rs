//! A content digest of a written object: what the planner compares instead of the objects.
//!
//! The digest covers the kind, the spec as it is serialised for server-side apply, and the
//! values of the labels flotilla sets. Two objects with the same digest would be written with the
//! same content, so an observed object whose digest equals the desired one needs no write. It is
//! computed once per object: when a desired object is built, and when an observed one is read.
//! SipHash-1-3 with 128 bits makes an accidental match between two different contents
//! (about 2⁻¹²⁸ per comparison) far less likely than any other failure.

use std::cell::RefCell;
use std::hash::Hasher;

use siphasher::sip128::{Hasher128, SipHasher13};

use super::DesiredObject;
use crate::meta::{LABEL_ENV, LABEL_IDENTITY, LABEL_MANAGED_BY};

/// The labels flotilla sets on everything it writes; only their values count in a digest.
const OUR_LABELS: [&str; 3] = [LABEL_MANAGED_BY, LABEL_IDENTITY, LABEL_ENV];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Digest(u128);

impl Digest {
    pub fn of(object: &DesiredObject) -> Digest {
        thread_local! {
            // The spec is serialised here first and hashed in one call: serde_json writes a
            // token at a time, and hashing each token on its own costs more than the copy.
            static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        BUFFER.with_borrow_mut(|buffer| {
            buffer.clear();
            let spec = match object {
                DesiredObject::DestinationRule(o) => serde_json::to_writer(&mut *buffer, &o.spec),
                DesiredObject::ServiceEntry(o) => serde_json::to_writer(&mut *buffer, &o.spec),
                DesiredObject::Sidecar(o) => serde_json::to_writer(&mut *buffer, &o.spec),
            };
            spec.expect("serialising a spec into memory cannot fail");
            let mut h = SipHasher13::new();
            h.write_u8(object.kind() as u8);
            h.write_usize(buffer.len());
            h.write(buffer);
            let labels = object.meta().labels.as_ref();
            for key in OUR_LABELS {
                // Length-prefixed, so that no two label sets hash the same bytes.
                match labels.and_then(|l| l.get(key)) {
                    None => h.write_u8(0),
                    Some(v) => {
                        h.write_u8(1);
                        h.write_usize(v.len());
                        h.write(v.as_bytes());
                    }
                }
            }
            Digest(h.finish128().as_u128())
        })
    }
}
