//! YAML in and out, in one place: serde-saphyr for both directions, `serde_json::Value` as the
//! dynamic document type (serde-saphyr has none of its own).
//!
//! Printing is most of `render`'s time, and most of serde-saphyr's printing is deciding, string
//! by string, whether a scalar must be quoted. Our objects are nearly all plain names, so
//! `to_yaml` prints the common shapes itself and asks serde-saphyr only about the scalars that
//! are not plainly safe, or hands it the whole value when a shape is not one it knows. The bytes
//! are serde-saphyr's either way: a property test compares the two on random documents.

use serde::Serialize;

/// Serialises one value as a YAML document body (no leading `---`), byte for byte as
/// serde-saphyr does.
pub fn to_yaml<T: Serialize>(value: &T) -> String {
    let mut out = String::new();
    push_yaml(&mut out, value);
    out
}

/// Appends what `to_yaml` returns to `out` (printing many objects into one buffer).
pub fn push_yaml<T: Serialize>(out: &mut String, value: &T) {
    // Serialising our own plain data types cannot fail; a failure is a programming error.
    let json = serde_json::to_string(value).expect("serialising to JSON");
    let start = out.len();
    if block::print(&json, out).is_none() {
        out.truncate(start);
        out.push_str(&saphyr(value));
    }
}

fn saphyr<T: Serialize>(value: &T) -> String {
    serde_saphyr::to_string(value).expect("serialising to YAML")
}

/// Parses a multi-document YAML stream into dynamic documents; empty documents are dropped.
pub fn parse_documents(text: &str) -> Result<Vec<serde_json::Value>, String> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Parses a multi-document YAML stream straight into `T`, document by document; empty documents
/// are dropped. Strict where typed parsing would be lenient: an unquoted scalar that YAML reads
/// as a number or boolean is not taken for a string field (`labels: {version: 1}`), so that it
/// fails here as it fails through `serde_json::Value` and as the API server would refuse it.
pub fn parse_documents_as<T: serde::de::DeserializeOwned>(text: &str) -> Result<Vec<T>, String> {
    serde_saphyr::from_multiple_with_options(text, serde_saphyr::options! { no_schema: true })
        .map_err(|e| e.to_string())
}

/// Block-style YAML from compact JSON text (what `serde_json::to_string` wrote, so well-formed).
/// `None` where the layout is not one this printer knows (empty collections, nested sequences,
/// nulls, floats, a key that needs quoting, a scalar serde-saphyr would spread over lines): the
/// caller then asks serde-saphyr for the whole value.
mod block {
    use std::borrow::Cow;

    /// Appends the YAML to `out`; on `None` what it appended is partial.
    pub fn print(json: &str, out: &mut String) -> Option<()> {
        out.reserve(json.len() * 2);
        let mut p = Printer { json: json.as_bytes(), at: 0, out };
        match p.peek()? {
            b'{' => p.map(0, false)?,
            _ => return None,
        }
        (p.at == p.json.len()).then_some(())
    }

    struct Printer<'a> {
        json: &'a [u8],
        at: usize,
        out: &'a mut String,
    }

    impl<'a> Printer<'a> {
        fn peek(&self) -> Option<u8> {
            self.json.get(self.at).copied()
        }

        fn eat(&mut self, byte: u8) -> Option<()> {
            (self.peek()? == byte).then(|| self.at += 1)
        }

        fn indent(&mut self, n: usize) {
            self.out.extend(std::iter::repeat_n(' ', n));
        }

        /// A non-empty map whose entries start at column `indent`. `inline_first`: the first
        /// entry follows a `- ` already printed.
        fn map(&mut self, indent: usize, inline_first: bool) -> Option<()> {
            self.eat(b'{')?;
            if self.peek()? == b'}' {
                return None;
            }
            let mut first = true;
            loop {
                if !(first && inline_first) {
                    self.indent(indent);
                }
                first = false;
                let key = self.string()?;
                if !is_plain(&key) {
                    return None;
                }
                self.out.push_str(&key);
                self.eat(b':')?;
                self.out.push(':');
                self.value_after_key(indent)?;
                match self.peek()? {
                    b',' => self.at += 1,
                    b'}' => {
                        self.at += 1;
                        return Some(());
                    }
                    _ => return None,
                }
            }
        }

        /// A non-empty sequence whose `- ` start at column `indent`.
        fn seq(&mut self, indent: usize) -> Option<()> {
            self.eat(b'[')?;
            if self.peek()? == b']' {
                return None;
            }
            loop {
                self.indent(indent);
                self.out.push_str("- ");
                match self.peek()? {
                    b'{' => self.map(indent + 2, true)?,
                    b'[' => return None,
                    _ => {
                        self.scalar()?;
                        self.out.push('\n');
                    }
                }
                match self.peek()? {
                    b',' => self.at += 1,
                    b']' => {
                        self.at += 1;
                        return Some(());
                    }
                    _ => return None,
                }
            }
        }

        fn value_after_key(&mut self, indent: usize) -> Option<()> {
            match self.peek()? {
                b'{' => {
                    self.out.push('\n');
                    self.map(indent + 2, false)
                }
                b'[' => {
                    self.out.push('\n');
                    self.seq(indent)
                }
                _ => {
                    self.out.push(' ');
                    self.scalar()?;
                    self.out.push('\n');
                    Some(())
                }
            }
        }

        fn scalar(&mut self) -> Option<()> {
            match self.peek()? {
                b'"' => {
                    let s = self.string()?;
                    if is_plain(&s) {
                        self.out.push_str(&s);
                    } else {
                        push_quoted(self.out, &s)?;
                    }
                }
                b't' | b'f' => {
                    let word = if self.json[self.at..].starts_with(b"true") { "true" } else { "false" };
                    self.at += word.len();
                    self.out.push_str(word);
                }
                b'-' | b'0'..=b'9' => {
                    let start = self.at;
                    self.at += 1;
                    while self.peek().is_some_and(|b| b.is_ascii_digit()) {
                        self.at += 1;
                    }
                    if matches!(self.peek()?, b'.' | b'e' | b'E') {
                        return None;
                    }
                    self.out.push_str(std::str::from_utf8(&self.json[start..self.at]).ok()?);
                }
                _ => return None, // null
            }
            Some(())
        }

        /// A JSON string, unescaped; borrowed from the JSON text unless it had escapes.
        fn string(&mut self) -> Option<Cow<'a, str>> {
            let start = self.at;
            self.eat(b'"')?;
            let mut escaped = false;
            loop {
                match self.peek()? {
                    b'\\' => {
                        escaped = true;
                        self.at += 2;
                    }
                    b'"' => break,
                    _ => self.at += 1,
                }
            }
            self.at += 1;
            let text = std::str::from_utf8(&self.json[start..self.at]).ok()?;
            if escaped {
                serde_json::from_str(text).ok().map(Cow::Owned)
            } else {
                Some(Cow::Borrowed(&text[1..text.len() - 1]))
            }
        }
    }

    /// serde-saphyr's own choice for one scalar that is not plainly safe, if it fits on a line.
    /// Such scalars repeat (addresses, durations), and asking costs a serializer each time, so
    /// each thread remembers its answers.
    fn push_quoted(out: &mut String, s: &str) -> Option<()> {
        thread_local! {
            static ASKED: std::cell::RefCell<std::collections::HashMap<String, Option<String>>> = Default::default();
        }
        ASKED.with_borrow_mut(|asked| {
            if asked.len() > 100_000 {
                asked.clear();
            }
            if !asked.contains_key(s) {
                let printed = super::saphyr(&s);
                let line = printed.strip_suffix('\n').filter(|l| !l.contains('\n') && !l.is_empty());
                asked.insert(s.to_string(), line.map(str::to_string));
            }
            out.push_str(asked[s].as_deref()?);
            Some(())
        })
    }

    /// A string serde-saphyr prints bare: a letter, then letters, digits and `.-_/`, short enough
    /// never to be folded, and not a word YAML reads as something else.
    pub(super) fn is_plain(s: &str) -> bool {
        let mut bytes = s.bytes();
        bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
            && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/'))
            && s.len() <= 64
            && !["true", "false", "yes", "no", "on", "off", "y", "n", "null", "nan", "inf"]
                .iter()
                .any(|word| s.eq_ignore_ascii_case(word))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// Strings YAML reads as something other than a string, or that need quotes for other reasons.
    const YAML_WORDS: [&str; 24] = [
        "true", "False", "yes", "No", "on", "OFF", "y", "N", "null", "Null", "nan", "inf", ".inf", "~", "*", "", " a",
        "a: b", "#x", "-", "0x1F", "1e3", "0o17", "12:30",
    ];

    /// Strings that are names, numbers, words YAML reads specially, and punctuation.
    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            "[a-zA-Z][a-zA-Z0-9._/-]{0,12}".prop_map(Value::from),
            "[0-9][0-9a-z.:]{0,10}".prop_map(Value::from),
            prop::sample::select(YAML_WORDS.to_vec()).prop_map(Value::from),
            "[ -~]{0,10}".prop_map(Value::from),
            "[a-z]{60,90}".prop_map(Value::from),
            "a\nb|é".prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            Just(Value::Null),
            Just(Value::from(0.5)),
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof!["[a-z][a-zA-Z0-9.-]{0,8}", "[a-z]{1,3}\\.io/[a-zA-Z]{1,6}", "[ -~]{0,4}"]
    }

    fn document() -> impl Strategy<Value = Value> {
        let leaf = scalar();
        let value = leaf.prop_recursive(4, 48, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(key(), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        prop::collection::btree_map(key(), value, 1..5).prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    /// Documents of the shapes the printer knows: non-empty collections, no nulls or floats,
    /// keys that need no quotes, strings on one line (quoted or not), no sequence in a sequence.
    fn known_document() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            "[a-zA-Z][a-zA-Z0-9._/-]{0,12}".prop_map(Value::from),
            "[0-9][0-9a-z.:]{0,10}".prop_map(Value::from),
            prop::sample::select(YAML_WORDS.to_vec()).prop_map(Value::from),
            "[ -~]{0,10}".prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
        ];
        let plain_key = "[a-z][a-zA-Z0-9.-]{0,8}|[a-z]{1,3}\\.io/[a-zA-Z]{1,6}";
        let map_of = move |inner: BoxedStrategy<Value>| {
            let key = plain_key.prop_filter("a key printed bare", |k: &String| block::is_plain(k));
            prop::collection::btree_map(key, inner, 1..4).prop_map(|m| Value::Object(m.into_iter().collect()))
        };
        let value = leaf.prop_recursive(4, 48, 4, move |inner| {
            let item = prop_oneof![inner.clone().prop_filter("no sequence in a sequence", |v| !v.is_array())];
            prop_oneof![prop::collection::vec(item, 1..4).prop_map(Value::from), map_of(inner.boxed())]
        });
        map_of(value.boxed())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        /// Whatever the document, `to_yaml` writes what serde-saphyr writes.
        #[test]
        fn to_yaml_prints_what_serde_saphyr_prints(doc in document()) {
            prop_assert_eq!(to_yaml(&doc), saphyr(&doc));
        }

        /// The shapes the printer knows take its path, and it writes what serde-saphyr writes.
        #[test]
        fn the_printer_prints_known_shapes_as_serde_saphyr_does(doc in known_document()) {
            let json = serde_json::to_string(&doc).expect("JSON");
            let mut out = String::new();
            prop_assert_eq!(block::print(&json, &mut out).map(|()| out), Some(saphyr(&doc)));
        }
    }

    #[test]
    fn our_objects_take_the_fast_path() {
        let json = r#"{"apiVersion":"networking.istio.io/v1","kind":"ServiceEntry","spec":{"hosts":["a.global"],"addresses":["240.0.0.1"],"ports":[{"number":80,"name":"http"}],"endpoints":[{"address":"10.0.0.1","ports":{"http":15443},"labels":{"security.istio.io/tlsMode":"istio"}}]}}"#;
        let doc: Value = serde_json::from_str(json).expect("valid JSON");
        let mut out = String::new();
        assert_eq!(
            block::print(&serde_json::to_string(&doc).expect("JSON"), &mut out).map(|()| out),
            Some(saphyr(&doc))
        );
    }
}
