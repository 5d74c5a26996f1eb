//! YAML in and out, in one place: serde-saphyr for both directions, `serde_json::Value` as the
//! dynamic document type (serde-saphyr has none of its own).

use serde::Serialize;

/// Serialises one object as a YAML document body (no leading `---`).
pub fn to_yaml<T: Serialize>(value: &T) -> String {
    // Serialising our own plain data types cannot fail; a failure is a programming error.
    serde_saphyr::to_string(value).expect("serialising to YAML")
}

/// Parses a multi-document YAML stream into dynamic documents; empty documents are dropped.
pub fn parse_documents(text: &str) -> Result<Vec<serde_json::Value>, String> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}
