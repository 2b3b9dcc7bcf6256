//! Lenient, borrowing reads of license servers' JSON, for the adapters.
//!
//! An adapter declares the few fields it reads as small structs of [`Scalar`]s, [`Obj`]s and
//! [`First`]s and parses a body straight into them: strings are borrowed from the captured
//! body (copied only when they hold escapes), everything else is skipped without being built.
//! A field of an unexpected JSON type reads as absent instead of failing the whole body, and a
//! key that repeats counts with its last value, both as with a lookup in a `serde_json::Value`
//! tree, at a fraction of the cost (the tree allocates every object, key and string of both
//! bodies).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A JSON value where a scalar is expected. `Absent` for a missing field or `null`; an object
/// or array reads as `Other`.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Scalar<'a> {
    #[default]
    Absent,
    Str(Cow<'a, str>),
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Other,
}

impl<'a> Scalar<'a> {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Scalar::U64(n) => Some(*n),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Scalar::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The string, without copying it.
    pub fn into_str(self) -> Option<Cow<'a, str>> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A string, or a number as its decimal text (ids some APIs send as numbers).
    pub fn into_text(self) -> Option<Cow<'a, str>> {
        match self {
            Scalar::Str(s) => Some(s),
            Scalar::U64(n) => Some(n.to_string().into()),
            Scalar::I64(n) => Some(n.to_string().into()),
            // As serde_json prints it (`1.0`, `1e20`), the way the value reads in the body.
            Scalar::F64(n) => serde_json::Number::from_f64(n).map(|n| n.to_string().into()),
            _ => None,
        }
    }

    /// [`Scalar::into_text`] when it is a short name or id: not empty and at most 128 bytes
    /// (longer values are left out of events rather than refused).
    pub fn into_short(self) -> Option<Cow<'a, str>> {
        self.into_text().filter(|s| !s.is_empty() && s.len() <= 128)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::U64(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Scalar<'de>, E> {
        Ok(match u64::try_from(v) {
            Ok(n) => Scalar::U64(n),
            Err(_) => Scalar::I64(v),
        })
    }
    fn visit_f64<E>(self, v: f64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::F64(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Absent)
    }
    fn visit_none<E>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Absent)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Scalar<'de>, D::Error> {
        Scalar::deserialize(d)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

/// A JSON object read as `T` (a struct of the fields wanted), or `None` when the value is
/// absent, `null` or not an object.
#[derive(Debug, Clone, PartialEq)]
pub struct Obj<T>(pub Option<T>);

impl<T> Default for Obj<T> {
    fn default() -> Self {
        Obj(None)
    }
}

impl<T> Obj<T> {
    pub fn get(&self) -> Option<&T> {
        self.0.as_ref()
    }
}

/// Skips whatever a visitor was handed that is not the shape it wants.
macro_rules! none_for_scalars {
    ($v:ty) => {
        fn visit_bool<E>(self, _: bool) -> Result<$v, E> {
            Ok(Default::default())
        }
        fn visit_i64<E>(self, _: i64) -> Result<$v, E> {
            Ok(Default::default())
        }
        fn visit_u64<E>(self, _: u64) -> Result<$v, E> {
            Ok(Default::default())
        }
        fn visit_f64<E>(self, _: f64) -> Result<$v, E> {
            Ok(Default::default())
        }
        fn visit_str<E>(self, _: &str) -> Result<$v, E> {
            Ok(Default::default())
        }
        fn visit_unit<E>(self) -> Result<$v, E> {
            Ok(Default::default())
        }
        fn visit_none<E>(self) -> Result<$v, E> {
            Ok(Default::default())
        }
    };
}

struct ObjVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjVisitor<T> {
    type Value = Obj<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    none_for_scalars!(Obj<T>);
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Obj<T>, D::Error> {
        Obj::deserialize(d)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map)).map(|t| Obj(Some(t)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Obj<T>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Obj(None))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ObjVisitor(PhantomData))
    }
}

/// The first element of a JSON array, read as an [`Obj`] (`errors[0]` of a JSON:API answer);
/// `None` for an empty array or anything that is not an array.
#[derive(Debug, Clone, PartialEq)]
pub struct First<T>(pub Option<T>);

impl<T> Default for First<T> {
    fn default() -> Self {
        First(None)
    }
}

impl<T> First<T> {
    pub fn get(&self) -> Option<&T> {
        self.0.as_ref()
    }
}

struct FirstVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for FirstVisitor<T> {
    type Value = First<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    none_for_scalars!(First<T>);
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<First<T>, D::Error> {
        First::deserialize(d)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<First<T>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(First(None))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<First<T>, A::Error> {
        let first = seq.next_element::<Obj<T>>()?.and_then(|o| o.0);
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(First(first))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for First<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FirstVisitor(PhantomData))
    }
}

/// One top-level field of a JSON object, found without reading the others into anything:
/// `None` when the text is not a JSON object or has no such field. When the field repeats,
/// the last one counts (as in a `serde_json::Value`).
pub fn top_field<'a>(json: &'a [u8], name: &str) -> Option<Scalar<'a>> {
    struct Find<'n>(&'n str);
    impl<'de> DeserializeSeed<'de> for Find<'_> {
        type Value = Option<Scalar<'de>>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Find<'_> {
        type Value = Option<Scalar<'de>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if key == self.0 {
                    found = Some(map.next_value::<Scalar<'de>>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    let found = Find(name).deserialize(&mut de).ok()?;
    de.end().ok()?;
    found
}

/// Parses a whole JSON text into `T` (trailing characters other than whitespace refuse it).
/// A key that repeats in an object counts with its last value, as servers' JSON parsers take
/// it: serde's derived structs refuse a repeated field, so such a text is read again through a
/// `serde_json::Value` (which keeps the last), on that rare path only.
pub fn parse<'a, T: Deserialize<'a>>(json: &'a [u8]) -> Result<T, serde_json::Error> {
    match serde_json::from_slice(json) {
        Ok(t) => Ok(t),
        Err(e) => match serde_json::from_slice::<serde_json::Value>(json) {
            Ok(tree) => T::deserialize(tree),
            Err(_) => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default)]
    struct Doc<'a> {
        #[serde(borrow)]
        name: Scalar<'a>,
        #[serde(borrow)]
        inner: Obj<Inner<'a>>,
        #[serde(borrow)]
        errors: First<Inner<'a>>,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default)]
    struct Inner<'a> {
        #[serde(borrow)]
        code: Scalar<'a>,
        #[serde(borrow)]
        count: Scalar<'a>,
    }

    #[test]
    fn wanted_fields_are_read_and_the_rest_skipped() {
        let json = br#"{"skip":{"deep":[1,{"x":null}]},"name":"plain","inner":{"code":"A\"B","count":3,"more":[]},
            "errors":[{"code":"FIRST"},{"code":"SECOND"}]}"#;
        let d: Doc = parse(json).unwrap();
        assert!(matches!(d.name, Scalar::Str(Cow::Borrowed("plain"))), "borrowed");
        let inner = d.inner.get().unwrap();
        assert!(
            matches!(&inner.code, Scalar::Str(Cow::Owned(s)) if s == "A\"B"),
            "unescaped"
        );
        assert_eq!(inner.count.as_u64(), Some(3));
        assert_eq!(d.errors.get().unwrap().code.as_str(), Some("FIRST"));
    }

    #[test]
    fn unexpected_types_read_as_absent() {
        let json = br#"{"name":{"an":"object"},"inner":[1,2],"errors":{"code":"X"}}"#;
        let d: Doc = parse(json).unwrap();
        assert_eq!(d.name, Scalar::Other);
        assert!(d.inner.get().is_none() && d.errors.get().is_none());
        let d: Doc = parse(br#"{"name":null,"inner":"text","errors":[]}"#).unwrap();
        assert_eq!(d.name, Scalar::Absent);
        assert!(d.inner.get().is_none() && d.errors.get().is_none());
        let d: Doc = parse(br#"{"inner":{"count":-2},"errors":[7,{"code":"late"}]}"#).unwrap();
        assert_eq!(d.inner.get().unwrap().count, Scalar::I64(-2));
        assert_eq!(d.inner.get().unwrap().count.as_u64(), None);
        assert!(d.errors.get().is_none(), "the first element is not an object");
        assert!(parse::<Doc>(br#"{"name":"x"} trailing"#).is_err());
        assert!(parse::<Obj<Doc>>(br#"[1]"#).unwrap().get().is_none(), "not an object");
        assert!(
            parse::<Obj<Doc>>(br#""text""#).unwrap().get().is_none(),
            "not an object"
        );
    }

    #[test]
    fn a_repeated_key_counts_with_its_last_value() {
        let json = br#"{"name":"first","inner":{"code":"A","code":"B"},"name":"last"}"#;
        let d: Obj<Doc> = parse(json).unwrap();
        let d = d.get().unwrap();
        assert_eq!(d.name.as_str(), Some("last"));
        assert_eq!(d.inner.get().unwrap().code.as_str(), Some("B"));
        assert!(parse::<Obj<Doc>>(br#"{"name":"x","name":}"#).is_err(), "not JSON");
    }

    #[test]
    fn numbers_read_as_text() {
        // Floats print as a serde_json::Value prints them.
        for text in ["1.0", "1e20", "0.5", "-2.25"] {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            let n = v.as_f64().unwrap();
            assert_eq!(Scalar::F64(n).into_text().unwrap(), v.to_string(), "{text}");
        }
        assert_eq!(Scalar::U64(42).into_text().as_deref(), Some("42"));
        assert_eq!(Scalar::I64(-1).into_text().as_deref(), Some("-1"));
        assert_eq!(Scalar::Bool(true).into_text(), None);
        assert_eq!(Scalar::Str("".into()).into_short(), None);
        assert_eq!(Scalar::Str("x".repeat(129).into()).into_short(), None);
        assert_eq!(Scalar::Str("x".repeat(128).into()).into_short().unwrap().len(), 128);
    }

    #[test]
    fn top_fields_are_found_without_a_tree() {
        let json = br#"{"license_key":"K-1","nested":{"license_key":"inner"},"instance_id":12,"dup":"a","dup":"b"}"#;
        assert_eq!(top_field(json, "license_key").unwrap().as_str(), Some("K-1"));
        assert_eq!(
            top_field(json, "instance_id").unwrap().into_text().as_deref(),
            Some("12")
        );
        assert_eq!(top_field(json, "dup").unwrap().as_str(), Some("b"));
        assert_eq!(top_field(json, "missing"), None);
        assert_eq!(top_field(b"[1,2]", "license_key"), None);
        assert_eq!(top_field(br#"{"license_key":"K"} x"#, "license_key"), None);
        assert_eq!(
            top_field(br#"{"license\u005fkey":"K"}"#, "license_key")
                .unwrap()
                .as_str(),
            Some("K")
        );
    }
}
