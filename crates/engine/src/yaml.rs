//! A YAML document as a tree of nodes that remember their line and column.
//!
//! serde-saphyr parses (it rejects duplicate keys and reports syntax errors
//! with their position); the config module then walks this tree itself, so
//! that every error names the key path *and* the line of the offending node.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// A position in the config file (1-based; 0 when unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// Line, 1-based.
    pub line: u64,
    /// Column, 1-based.
    pub column: u64,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str("unknown position")
        } else {
            write!(f, "line {}, column {}", self.line, self.column)
        }
    }
}

/// One YAML node.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// A node with its position.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    /// What kind of value this is, for error messages.
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Null => "nothing (null)".into(),
            Value::Bool(b) => format!("boolean {b}"),
            Value::Int(i) => format!("integer {i}"),
            Value::Float(x) => format!("number {x}"),
            Value::Str(s) => format!("string `{s}`"),
            Value::Seq(_) => "a list".into(),
            Value::Map(_) => "a mapping".into(),
        }
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .or(Ok(Value::Float(v as f64)))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .or(Ok(Value::Float(v as f64)))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .or(Ok(Value::Float(v as f64)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(n) = seq.next_element::<Node>()? {
            out.push(n);
        }
        Ok(Value::Seq(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(k) = map.next_key::<Node>()? {
            let v = map.next_value::<Node>()?;
            out.push((k, v));
        }
        Ok(Value::Map(out))
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<Value>::deserialize(d)?;
        Ok(Node {
            value: s.value,
            pos: Pos {
                line: s.referenced.line(),
                column: s.referenced.column(),
            },
        })
    }
}

/// Parses a YAML document. The error is serde-saphyr's, with its position.
///
/// Booleans are YAML 1.2's `true`/`false` only: a model named `y` or `on` is
/// a string, as PyYAML (mergekit's parser) reads it, rather than a boolean.
pub(crate) fn parse(text: &str) -> Result<Node, (String, Pos)> {
    let options = serde_saphyr::options! { strict_booleans: true };
    serde_saphyr::from_str_with_options::<Node>(text, options).map_err(|e| {
        let pos = e
            .location()
            .map(|l| Pos {
                line: l.line(),
                column: l.column(),
            })
            .unwrap_or_default();
        (e.to_string(), pos)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_carry_lines_and_types() {
        let n = parse("a: 1\nb:\n  - 0.5\n  - x\nc: true\nd: ~\n").unwrap();
        let Value::Map(m) = n.value else {
            panic!("not a map")
        };
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].0.value, Value::Str("a".into()));
        assert_eq!(m[0].1.value, Value::Int(1));
        assert_eq!(m[0].1.pos.line, 1);
        let Value::Seq(s) = &m[1].1.value else {
            panic!("not a seq")
        };
        assert_eq!(s[0].value, Value::Float(0.5));
        assert_eq!(s[0].pos.line, 3);
        assert_eq!(s[1].value, Value::Str("x".into()));
        assert_eq!(s[1].pos.line, 4);
        assert_eq!(m[2].1.value, Value::Bool(true));
        assert_eq!(m[3].1.value, Value::Null);
        assert_eq!(m[3].0.pos.line, 6);
        let n = parse("- y\n- n\n- on\n- True\n").unwrap();
        let Value::Seq(s) = n.value else {
            panic!("not a seq")
        };
        let v: Vec<&Value> = s.iter().map(|n| &n.value).collect();
        assert_eq!(
            v,
            [
                &Value::Str("y".into()),
                &Value::Str("n".into()),
                &Value::Str("on".into()),
                &Value::Bool(true)
            ]
        );
    }

    #[test]
    fn duplicate_keys_and_syntax_errors_are_reported_with_position() {
        let (msg, pos) = parse("a: 1\na: 2\n").unwrap_err();
        assert!(msg.to_lowercase().contains("duplicate"), "{msg}");
        assert_eq!(pos.line, 2);
        let (_, pos) = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(pos.line >= 1);
    }
}
