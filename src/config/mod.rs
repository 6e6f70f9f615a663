//! One config layer: the JSON files `diffuse` reads, as serde-derived types, one file per format.
//!
//! | file | module | unknown fields |
//! | --- | --- | --- |
//! | diffusers `config.json` (`UNet2DModel`) | [`unet`] | accepted, listed ([`Parsed::ignored`]) |
//! | diffusers `scheduler_config.json` | [`scheduler`] | accepted, listed |
//! | mixture specs (`gmm:FILE.json`) | [`mixture`] | an error naming the field |
//! | `info.json` beside generated samples | [`samples_info`] | an error naming the field |
//!
//! diffusers adds keys with every release (and `_class_name`, `_diffusers_version` are
//! metadata), so its files may carry fields we do not read; our own files are written by us, so
//! an unknown field there is a typo or a file of another kind. Present fields of the wrong type
//! or out of range are errors in both.
//!
//! Every file is read through [`from_value`], a small serde deserializer over a parsed
//! [`serde_json::Value`] that tracks where it is, so each error is one line naming the field and
//! saying what was expected and what was found:
//!
//! ```text
//! scheduler_config.json: field `clip_sample`: expected a boolean, found "yes"
//! mix.json: field `means[1][0]`: expected a number, found "1"
//! info.json: field `training_dat`: unknown field (this file's fields: n, shape, ...)
//! ```
//!
//! Training defaults, the constants the CLI and the library share, are in [`defaults`].

pub mod defaults;
pub mod mixture;
pub mod samples_info;
pub mod scheduler;
pub mod unet;

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};
use serde::Deserialize;
use serde_json::Value;

/// One step of a path into a JSON document: an object key or a list index.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// An error reading a config file: where (the field path, empty for the whole document) and
/// what (`expected ..., found ...`). Displayed as ``field `a.b[2]`: message``, one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    path: Vec<Segment>,
    message: String,
}

impl FieldError {
    /// An error about the field `key` of the top-level object.
    pub fn at(key: &str, message: impl Into<String>) -> Self {
        FieldError {
            path: vec![Segment::Key(key.to_string())],
            message: message.into(),
        }
    }

    /// An error about entry `index` of the list in field `key`.
    pub fn at_index(key: &str, index: usize, message: impl Into<String>) -> Self {
        FieldError {
            path: vec![Segment::Key(key.to_string()), Segment::Index(index)],
            message: message.into(),
        }
    }

    /// The field path (`means[1][0]`), empty for the whole document.
    pub fn field(&self) -> String {
        let mut s = String::new();
        for seg in &self.path {
            match seg {
                Segment::Key(k) if s.is_empty() => s.push_str(&key_text(k)),
                Segment::Key(k) => {
                    s.push('.');
                    s.push_str(&key_text(k));
                }
                Segment::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        s
    }

    /// The error one level down: `seg` goes in front of the path.
    fn within(mut self, seg: Segment) -> Self {
        self.path.insert(0, seg);
        self
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "field `{}`: {}", self.field(), self.message)
        }
    }
}

impl std::error::Error for FieldError {}

/// serde's names of what a visitor expects, in words.
fn expected_words(exp: &dyn de::Expected) -> String {
    let s = exp.to_string();
    match s.as_str() {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a non-negative integer".into(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "an integer".into(),
        "f32" | "f64" => "a number".into(),
        "a sequence" => "a list".into(),
        "a map" => "an object".into(),
        "a string" | "a boolean" => s,
        _ if s.starts_with("struct ") => "an object".into(),
        _ if s.starts_with("an array of length ") => s.replacen("an array", "a list", 1),
        _ if s.starts_with("a tuple of size ") => s.replacen("a tuple of size", "a list of length", 1),
        _ if s.starts_with("option") || s.starts_with("Option") => "a value or null".into(),
        _ => s,
    }
}

/// What was found, as the JSON it came from.
fn found_words(u: de::Unexpected<'_>) -> String {
    use de::Unexpected as U;
    match u {
        U::Bool(b) => b.to_string(),
        U::Unsigned(v) => v.to_string(),
        U::Signed(v) => v.to_string(),
        // Debug: 1e300, not 301 digits
        U::Float(v) => format!("{v:?}"),
        U::Char(c) => format!("\"{c}\""),
        U::Str(s) => format!("\"{}\"", short(s)),
        U::Unit | U::Option => "null".into(),
        U::Seq => "a list".into(),
        U::Map => "an object".into(),
        other => other.to_string(),
    }
}

/// At most 60 characters of a string found in a file (a fuzzed file may hold a huge one).
fn short(s: &str) -> String {
    let mut out: String = s.chars().take(60).flat_map(char::escape_default).collect();
    if s.chars().nth(60).is_some() {
        out.push_str("...");
    }
    out
}

/// A key as it may be shown on one line: control characters escaped, at most 60 characters
/// (a damaged file may hold any key).
fn key_text(k: &str) -> String {
    let mut out = crate::error::escape_controls(&k.chars().take(60).collect::<String>());
    if k.chars().nth(60).is_some() {
        out.push_str("...");
    }
    out
}

/// A JSON value, as found in a file, for error messages (at most 60 characters).
pub fn found_value(v: &Value) -> String {
    match v {
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
        Value::String(s) => format!("\"{}\"", short(s)),
        other => other.to_string(),
    }
}

impl de::Error for FieldError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        FieldError {
            path: Vec::new(),
            message: msg.to_string(),
        }
    }

    fn invalid_type(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Self::custom(format!(
            "expected {}, found {}",
            expected_words(exp),
            found_words(unexp)
        ))
    }

    fn invalid_value(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Self::invalid_type(unexp, exp)
    }

    fn invalid_length(len: usize, exp: &dyn de::Expected) -> Self {
        Self::custom(format!("expected {}, found {len} entries", expected_words(exp)))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Self::custom(format!(
            "expected one of {}, found \"{}\"",
            expected.join(", "),
            short(variant)
        ))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        FieldError {
            path: vec![Segment::Key(field.to_string())],
            message: format!("unknown field (this file's fields: {})", expected.join(", ")),
        }
    }

    fn missing_field(field: &'static str) -> Self {
        FieldError::at(field, "missing (it is required)")
    }

    fn duplicate_field(field: &'static str) -> Self {
        FieldError::at(field, "given twice")
    }
}

/// A parsed file and the fields it carried that the reader does not use (diffusers files
/// only; keys starting with `_` are metadata and not listed).
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed<T> {
    /// The typed contents.
    pub value: T,
    /// Ignored fields, as paths (`foo`, `bar.baz`), in file order.
    pub ignored: Vec<String>,
}

/// Deserializes `T` from `value`; errors name the field. Fields `T` does not declare are
/// listed in [`Parsed::ignored`] (a type with `#[serde(deny_unknown_fields)]` rejects them
/// instead).
pub fn from_value<T: DeserializeOwned>(value: &Value) -> Result<Parsed<T>, FieldError> {
    let ignored = RefCell::new(Vec::new());
    let value = T::deserialize(ValueDe {
        value,
        prefix: String::new(),
        ignored: &ignored,
    })?;
    let ignored = ignored
        .into_inner()
        .into_iter()
        .filter(|k: &String| !k.starts_with('_'))
        .collect();
    Ok(Parsed { value, ignored })
}

/// Parses JSON text (`invalid JSON: ...` with line and column when it is not JSON), then
/// [`from_value`].
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<Parsed<T>, FieldError> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| <FieldError as de::Error>::custom(format!("invalid JSON: {e}")))?;
    from_value(&v)
}

/// The serde deserializer over a JSON value that knows its place in the document.
struct ValueDe<'a> {
    value: &'a Value,
    /// The path so far (for the ignored-field list).
    prefix: String,
    ignored: &'a RefCell<Vec<String>>,
}

impl<'a> ValueDe<'a> {
    fn child(&self, value: &'a Value, seg: &Segment) -> ValueDe<'a> {
        let prefix = match seg {
            Segment::Key(k) if self.prefix.is_empty() => key_text(k),
            Segment::Key(k) => format!("{}.{}", self.prefix, key_text(k)),
            Segment::Index(i) => format!("{}[{i}]", self.prefix),
        };
        ValueDe {
            value,
            prefix,
            ignored: self.ignored,
        }
    }
}

impl<'de> de::Deserializer<'de> for ValueDe<'de> {
    type Error = FieldError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    // serde_json without arbitrary_precision: every number is one of the three
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(items) => visitor.visit_seq(SeqDe {
                parent: &self,
                items: items.iter().enumerate(),
                len: items.len(),
            }),
            Value::Object(map) => visitor.visit_map(MapDe {
                parent: &self,
                entries: map.iter(),
                value: None,
            }),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, FieldError> {
        match self.value {
            Value::String(s) => {
                visitor.visit_enum(IntoDeserializer::<FieldError>::into_deserializer(s.as_str()))
            }
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, FieldError> {
        // serde's derived structs also accept a list of the fields in order; a config is an object
        match self.value {
            Value::Object(_) => self.deserialize_any(visitor),
            other => Err(<FieldError as de::Error>::custom(format!(
                "expected an object, found {}",
                found_value(other)
            ))),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, FieldError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, FieldError> {
        self.ignored.borrow_mut().push(self.prefix.clone());
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map identifier
    }
}

struct SeqDe<'p, 'a> {
    parent: &'p ValueDe<'a>,
    items: std::iter::Enumerate<std::slice::Iter<'a, Value>>,
    len: usize,
}

impl<'de> de::SeqAccess<'de> for SeqDe<'_, 'de> {
    type Error = FieldError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, FieldError> {
        match self.items.next() {
            None => Ok(None),
            Some((i, v)) => {
                let seg = Segment::Index(i);
                seed.deserialize(self.parent.child(v, &seg))
                    .map(Some)
                    .map_err(|e| e.within(seg))
            }
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.len)
    }
}

struct MapDe<'p, 'a> {
    parent: &'p ValueDe<'a>,
    entries: serde_json::map::Iter<'a>,
    value: Option<(&'a String, &'a Value)>,
}

impl<'de> de::MapAccess<'de> for MapDe<'_, 'de> {
    type Error = FieldError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, FieldError> {
        match self.entries.next() {
            None => Ok(None),
            Some((k, v)) => {
                self.value = Some((k, v));
                let key = de::value::BorrowedStrDeserializer::<FieldError>::new(k);
                seed.deserialize(key).map(Some)
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, FieldError> {
        // serde calls next_value_seed only after next_key_seed returned a key
        let Some((k, v)) = self.value.take() else {
            return Err(<FieldError as de::Error>::custom("a value without a key"));
        };
        let seg = Segment::Key(k.clone());
        seed.deserialize(self.parent.child(v, &seg))
            .map_err(|e| e.within(seg))
    }
}

/// A count written as a JSON integer, or as a float with no fractional part (Python writes
/// `2.0` for a value computed in floats): `usize`, non-negative, below 10^15 when a float.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Count(pub usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                usize::try_from(v)
                    .map(Count)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                usize::try_from(v)
                    .map(Count)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                if v.fract() == 0.0 && (0.0..1e15).contains(&v) {
                    Ok(Count(v as usize))
                } else {
                    Err(E::invalid_value(de::Unexpected::Float(v), &self))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// For `#[serde(default, deserialize_with = "present")]` on an `Option<Option<T>>`: absent is
/// `None`, `null` is `Some(None)`, a value is `Some(Some(v))`.
pub fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: de::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Strict {
        a: usize,
        b: Option<Vec<f64>>,
        c: Option<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        x: bool,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Lax {
        a: usize,
        c: Option<Inner>,
    }

    fn err<T: DeserializeOwned + fmt::Debug>(text: &str) -> String {
        from_str::<T>(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field_and_say_what_was_found() {
        assert_eq!(
            err::<Strict>(r#"{"a": -1}"#),
            "field `a`: expected a non-negative integer, found -1"
        );
        assert_eq!(
            err::<Strict>(r#"{"a": 1.5}"#),
            "field `a`: expected a non-negative integer, found 1.5"
        );
        assert_eq!(
            err::<Strict>(r#"{"a": 1, "b": [1, "x"]}"#),
            "field `b[1]`: expected a number, found \"x\""
        );
        assert_eq!(
            err::<Strict>(r#"{"a": 1, "c": {"x": null}}"#),
            "field `c.x`: expected a boolean, found null"
        );
        assert_eq!(
            err::<Strict>(r#"{"b": []}"#),
            "field `a`: missing (it is required)"
        );
        assert_eq!(err::<Strict>("[]"), "expected an object, found a list");
        assert!(err::<Strict>("{").starts_with("invalid JSON: "));
    }

    #[test]
    fn unknown_fields_are_errors_or_listed() {
        assert_eq!(
            err::<Strict>(r#"{"a": 1, "d": 2}"#),
            "field `d`: unknown field (this file's fields: a, b, c)"
        );
        assert_eq!(
            err::<Strict>(r#"{"a": 1, "c": {"x": true, "y": 0}}"#),
            "field `c.y`: unknown field (this file's fields: x)"
        );
        let p = from_str::<Lax>(r#"{"_meta": 1, "z": [1], "a": 2, "y": {"q": 1}}"#).unwrap();
        assert_eq!(p.value.a, 2);
        // serde_json's map keeps keys sorted; metadata (`_...`) is not listed
        assert_eq!(p.ignored, vec!["y".to_string(), "z".to_string()]);
    }

    #[test]
    fn odd_keys_stay_on_one_line() {
        let e = err::<Strict>("{\"a\": 1, \"x\\ny\": 2}");
        assert_eq!(e, "field `x\\ny`: unknown field (this file's fields: a, b, c)");
        let long = "k".repeat(100);
        let p = from_str::<Lax>(&format!("{{\"a\": 1, \"{long}\": 2}}")).unwrap();
        assert_eq!(p.ignored, vec![format!("{}...", "k".repeat(60))]);
    }

    #[test]
    fn counts_accept_integral_floats_only() {
        let c = |t: &str| from_str::<Count>(t).map(|p| p.value.0).map_err(|e| e.to_string());
        assert_eq!(c("3"), Ok(3));
        assert_eq!(c("3.0"), Ok(3));
        assert_eq!(c("3.5"), Err("expected a non-negative integer, found 3.5".into()));
        assert_eq!(c("-2"), Err("expected a non-negative integer, found -2".into()));
        assert_eq!(
            c("1e300"),
            Err("expected a non-negative integer, found 1e300".into())
        );
    }
}
