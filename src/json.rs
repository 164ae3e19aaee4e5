//! JSON as Python writes it, read into serde types with the failing field named.
//!
//! Python's `json` writes the non-finite floats as bare `NaN`, `Infinity` and
//! `-Infinity` (diffusers saves `"lambda_min_clipped": -Infinity` in every
//! DPM-Solver scheduler config), which strict JSON and serde_json refuse.
//! [`from_str`] first rewrites those tokens, outside strings only, into
//! marker strings, parses the text into a [`serde_json::Value`], and then
//! deserializes the target type through a small deserializer over that value
//! which hands a marker to the target as the float it stands for (so an `f64`
//! field reads `-Infinity` as `f64::NEG_INFINITY`, and a string field refuses
//! it as a float).
//!
//! The same deserializer tracks where it is in the document, so a value of the
//! wrong type is reported with its path (`vit.num_attention_heads`,
//! `block_out_channels[1]`): serde_json alone names only a line and column.
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::forward_to_deserialize_any;
use serde_json::Value;
use std::cell::RefCell;

/// Marker strings standing for the non-finite floats. They begin with a NUL
/// character, which a config's own strings do not contain.
const NAN: &str = "\u{0}NaN";
const INF: &str = "\u{0}Infinity";
const NEG_INF: &str = "\u{0}-Infinity";

fn marker_value(s: &str) -> Option<f64> {
    match s {
        NAN => Some(f64::NAN),
        INF => Some(f64::INFINITY),
        NEG_INF => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

/// Replaces the bare tokens `NaN`, `Infinity` and `-Infinity` outside strings
/// by JSON strings holding their markers. Everything else, malformed text
/// included, is copied unchanged (serde_json then reports it).
pub fn replace_non_finite(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut copied = 0; // bytes of `text` already in `out`
    let mut i = 0;
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'+' || b == b'-';
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        let token = [("-Infinity", "\\u0000-Infinity"), ("Infinity", "\\u0000Infinity"), ("NaN", "\\u0000NaN")]
            .into_iter()
            .find(|(tok, _)| bytes[i..].starts_with(tok.as_bytes()));
        if let Some((tok, marker)) = token {
            let before_ok = i == 0 || !is_word(bytes[i - 1]);
            let end = i + tok.len();
            let after_ok = end >= bytes.len() || !is_word(bytes[end]);
            if before_ok && after_ok {
                out.push_str(&text[copied..i]);
                out.push('"');
                out.push_str(marker);
                out.push('"');
                i = end;
                copied = end;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&text[copied..]);
    out
}

/// Parses `text` (Python-style non-finite floats allowed) into `T`. A value
/// that does not fit `T` is reported as "`path`: reason".
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, serde_json::Error> {
    let value: Value = serde_json::from_str(&replace_non_finite(text))?;
    from_value(&value)
}

/// Deserializes `T` from a value holding the markers of [`replace_non_finite`]
/// (a value without markers works the same as `serde_json::from_value`).
pub fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, serde_json::Error> {
    let failed_at = RefCell::new(None);
    T::deserialize(De { value, path: String::new(), failed_at: &failed_at }).map_err(|e| match failed_at.take() {
        Some(path) => de::Error::custom(format!("`{path}`: {e}")),
        None => e,
    })
}

/// A deserializer over one value at `path` of the document.
struct De<'a> {
    value: &'a Value,
    path: String,
    /// The innermost path where deserializing failed, set on the way out.
    failed_at: &'a RefCell<Option<String>>,
}

impl<'a> De<'a> {
    fn child(&self, value: &'a Value, path: String) -> De<'a> {
        De { value, path, failed_at: self.failed_at }
    }

    /// Deserializes a child value with `seed`, noting its path if it fails.
    fn run<'de, S: DeserializeSeed<'de>>(&self, seed: S, value: &'a Value, path: String) -> Result<S::Value, serde_json::Error> {
        let at = path.clone();
        seed.deserialize(self.child(value, path)).map_err(|e| {
            let mut f = self.failed_at.borrow_mut();
            if f.is_none() {
                *f = Some(at);
            }
            e
        })
    }
}

fn join_key(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl<'de, 'a> de::Deserializer<'de> for De<'a> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => match marker_value(s) {
                Some(f) => visitor.visit_f64(f),
                None => visitor.visit_str(s),
            },
            Value::Array(items) => visitor.visit_seq(Seq { de: &self, items: items.iter(), index: 0 }),
            Value::Object(map) => visitor.visit_map(Map { de: &self, entries: map.iter(), pending: None }),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    /// A struct only from an object: serde would also fill one from a list
    /// of its fields in order, which no config means.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Array(_) => Err(de::Error::invalid_type(de::Unexpected::Seq, &visitor)),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::String(s) if marker_value(s).is_none() => {
                let d: de::value::StrDeserializer<'_, serde_json::Error> = s.as_str().into_deserializer();
                visitor.visit_enum(d)
            }
            // Externally tagged data variants: serde_json's own handling
            // (no config this crate reads has them).
            other => de::Deserializer::deserialize_enum(other.clone(), name, variants, visitor),
        }
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map identifier ignored_any
    }
}

struct Seq<'b, 'a> {
    de: &'b De<'a>,
    items: std::slice::Iter<'a, Value>,
    index: usize,
}

impl<'de, 'b, 'a> SeqAccess<'de> for Seq<'b, 'a> {
    type Error = serde_json::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Self::Error> {
        match self.items.next() {
            None => Ok(None),
            Some(v) => {
                let path = format!("{}[{}]", self.de.path, self.index);
                self.index += 1;
                self.de.run(seed, v, path).map(Some)
            }
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct Map<'b, 'a> {
    de: &'b De<'a>,
    entries: serde_json::map::Iter<'a>,
    pending: Option<(&'a String, &'a Value)>,
}

impl<'de, 'b, 'a> MapAccess<'de> for Map<'b, 'a> {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Self::Error> {
        match self.entries.next() {
            None => Ok(None),
            Some((k, v)) => {
                self.pending = Some((k, v));
                let d: de::value::StrDeserializer<'_, serde_json::Error> = k.as_str().into_deserializer();
                seed.deserialize(d).map(Some)
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Self::Error> {
        let (k, v) = self.pending.take().ok_or_else(|| de::Error::custom("a map value without its key"))?;
        self.de.run(seed, v, join_key(&self.de.path, k))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Sched {
        lambda_min_clipped: Option<f64>,
        beta_start: f64,
        #[serde(default)]
        eta: Option<f64>,
        name: String,
        list: Vec<f64>,
    }

    #[test]
    fn python_non_finite_floats() {
        let text = r#"{"lambda_min_clipped": -Infinity, "beta_start": NaN, "eta": Infinity,
                       "name": "NaN -Infinity \" Infinity", "list": [1, -Infinity,NaN]}"#;
        let s: Sched = from_str(text).unwrap();
        assert_eq!(s.lambda_min_clipped, Some(f64::NEG_INFINITY));
        assert!(s.beta_start.is_nan());
        assert_eq!(s.eta, Some(f64::INFINITY));
        assert_eq!(s.name, "NaN -Infinity \" Infinity");
        assert_eq!(s.list[0], 1.0);
        assert_eq!(s.list[1], f64::NEG_INFINITY);
        assert!(s.list[2].is_nan());
    }

    #[test]
    fn non_finite_is_not_a_string() {
        let e = from_str::<Sched>(r#"{"beta_start": 1, "name": NaN, "list": []}"#).unwrap_err().to_string();
        assert!(e.contains("`name`"), "{e}");
        // Words that only contain the tokens are left alone (and refused by serde_json).
        assert!(from_str::<Value>("[NaNa]").is_err());
        assert!(from_str::<Value>("[xInfinity]").is_err());
        assert!(from_str::<Value>("[1e999]").is_err());
    }

    #[test]
    fn errors_name_the_path() {
        #[derive(Debug, Deserialize)]
        struct Inner {
            #[allow(dead_code)]
            heads: i64,
        }
        #[derive(Debug, Deserialize)]
        struct Outer {
            #[allow(dead_code)]
            vit: Inner,
            #[allow(dead_code)]
            #[serde(default)]
            sizes: Vec<i64>,
        }
        let e = from_str::<Outer>(r#"{"vit": {"heads": "x"}}"#).unwrap_err().to_string();
        assert!(e.contains("`vit.heads`"), "{e}");
        let e = from_str::<Outer>(r#"{"vit": {"heads": 1}, "sizes": [1, null]}"#).unwrap_err().to_string();
        assert!(e.contains("`sizes[1]`"), "{e}");
        let e = from_str::<Outer>(r#"{"vit": {}}"#).unwrap_err().to_string();
        assert!(e.contains("`vit`") && e.contains("heads"), "{e}");
        let e = from_str::<Outer>(r#"{"vit": {"heads": 1e12}}"#).unwrap_err().to_string();
        assert!(e.contains("`vit.heads`"), "{e}");
    }

    #[test]
    fn values_and_enums_round_trip() {
        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(rename_all = "kebab-case")]
        enum Variant {
            MultiHead,
            Augmented,
        }
        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(untagged)]
        enum PerBlock {
            One(i64),
            Each(Vec<i64>),
        }
        #[derive(Debug, Deserialize, PartialEq)]
        struct C {
            v: Variant,
            p: PerBlock,
            q: PerBlock,
            o: Option<i64>,
        }
        let c: C = from_str(r#"{"v": "multi-head", "p": 3, "q": [1, 2], "o": null}"#).unwrap();
        assert_eq!(c, C { v: Variant::MultiHead, p: PerBlock::One(3), q: PerBlock::Each(vec![1, 2]), o: None });
        let e = from_str::<C>(r#"{"v": "x", "p": 3, "q": 1, "o": null}"#).unwrap_err().to_string();
        assert!(e.contains("`v`"), "{e}");
        let v: Value = from_str(r#"{"a": [1, 2.5, "s", true, null, {"b": -3}]}"#).unwrap();
        assert_eq!(v, serde_json::json!({"a": [1, 2.5, "s", true, null, {"b": -3}]}));
    }
}
