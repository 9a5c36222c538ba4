//! Parsing and validation of one safetensors file header.
//!
//! Format (<https://github.com/huggingface/safetensors>): an 8-byte
//! little-endian header length `n`, `n` bytes of JSON mapping each tensor name
//! to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to
//! the data section after the header) plus an optional `__metadata__` object
//! of strings, then the data section. Every byte of the data section belongs to
//! exactly one tensor. We parse the header ourselves rather than through the
//! `safetensors` crate so that each failure is its own typed error naming the
//! file and the tensor, and so that tensors come out in file (offset) order
//! rather than hash order; the tests check our files with the `safetensors`
//! crate as an independent reader.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use tensormerge_core::{DType, TensorInfo};

use crate::IoError;

/// Largest header accepted, as in the safetensors crate.
pub(crate) const MAX_HEADER_LEN: u64 = 100_000_000;

/// A JSON object read with its keys in file order and duplicates kept, so
/// that a repeated key can be reported instead of silently shadowed.
pub(crate) struct OrderedObject<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedObject<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V2<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
            type Value = OrderedObject<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    out.push((k, v));
                }
                Ok(OrderedObject(out))
            }
        }
        d.deserialize_map(V2(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// One validated tensor entry. `start..end` are absolute byte offsets in the file.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub info: TensorInfo,
    pub start: usize,
    pub end: usize,
}

/// A validated header: entries in data-offset order.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub entries: Vec<Entry>,
    pub metadata: BTreeMap<String, String>,
}

/// Parses and validates the header of `bytes` (the whole file).
pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<Header, IoError> {
    let file_len = bytes.len() as u64;
    if bytes.len() < 8 {
        return Err(IoError::Truncated {
            path: path.to_path_buf(),
            len: file_len,
        });
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_LEN {
        return Err(IoError::HeaderTooLarge {
            path: path.to_path_buf(),
            header_len,
            limit: MAX_HEADER_LEN,
        });
    }
    if header_len > file_len - 8 {
        return Err(IoError::HeaderLengthExceedsFile {
            path: path.to_path_buf(),
            header_len,
            available: file_len - 8,
        });
    }
    let data_start = 8 + header_len as usize;
    let json = &bytes[8..data_start];
    let data_len = file_len - data_start as u64;
    let obj: OrderedObject<serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| IoError::HeaderJson {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;

    let mut metadata = BTreeMap::new();
    let mut raw = Vec::with_capacity(obj.0.len());
    let mut seen = std::collections::HashSet::new();
    let mut saw_metadata = false;
    for (name, value) in obj.0 {
        if name == "__metadata__" {
            if std::mem::replace(&mut saw_metadata, true) {
                return Err(IoError::DuplicateEntry {
                    path: path.to_path_buf(),
                    tensor: name,
                });
            }
            match value {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        match v {
                            serde_json::Value::String(s) => {
                                metadata.insert(k, s);
                            }
                            _ => {
                                return Err(IoError::MetadataNotString {
                                    path: path.to_path_buf(),
                                    key: k,
                                });
                            }
                        }
                    }
                }
                serde_json::Value::Null => {}
                _ => {
                    return Err(IoError::HeaderJson {
                        path: path.to_path_buf(),
                        message: "__metadata__ is not an object".into(),
                    });
                }
            }
            continue;
        }
        if !seen.insert(name.clone()) {
            return Err(IoError::DuplicateEntry {
                path: path.to_path_buf(),
                tensor: name,
            });
        }
        let entry: RawEntry = serde_json::from_value(value).map_err(|e| IoError::HeaderEntry {
            path: path.to_path_buf(),
            tensor: name.clone(),
            message: e.to_string(),
        })?;
        raw.push((name, entry));
    }

    let mut entries = Vec::with_capacity(raw.len());
    let mut spans = Vec::with_capacity(raw.len());
    for (name, e) in raw {
        let dtype = DType::ALL
            .into_iter()
            .find(|d| d.as_str() == e.dtype)
            .ok_or_else(|| IoError::UnknownDType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                dtype: e.dtype.clone(),
            })?;
        let overflow = || IoError::ShapeOverflow {
            path: path.to_path_buf(),
            tensor: name.clone(),
            shape: e.shape.clone(),
        };
        let byte_len = e
            .shape
            .iter()
            .try_fold(dtype.size_in_bytes() as u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(overflow)?;
        let shape = e
            .shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| overflow()))
            .collect::<Result<Vec<_>, _>>()?;
        let (begin, end) = e.data_offsets;
        if end < begin {
            return Err(IoError::InvalidOffsets {
                path: path.to_path_buf(),
                tensor: name,
                begin,
                end,
            });
        }
        if end - begin != byte_len {
            return Err(IoError::SizeMismatch {
                path: path.to_path_buf(),
                tensor: name,
                expected: byte_len,
                actual: end - begin,
            });
        }
        let info = TensorInfo::new(name.clone(), shape, dtype);
        if info.checked_byte_len().is_none() {
            return Err(overflow());
        }
        spans.push((begin, end));
        entries.push(info);
    }

    // File order: by data offset (ties: zero-sized tensors first, then name).
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|&a, &b| {
        (spans[a].0, spans[a].1, &entries[a].name).cmp(&(spans[b].0, spans[b].1, &entries[b].name))
    });
    let mut out = Vec::with_capacity(entries.len());
    let mut prev_end = 0u64;
    let mut prev_name: Option<String> = None;
    for i in order {
        let (begin, end) = spans[i];
        let name = &entries[i].name;
        if end > data_len {
            return Err(IoError::OutOfBounds {
                path: path.to_path_buf(),
                tensor: name.clone(),
                end,
                data_len,
            });
        }
        if begin < prev_end {
            return Err(IoError::Overlap {
                path: path.to_path_buf(),
                tensor: name.clone(),
                other: prev_name.clone().unwrap_or_default(),
            });
        }
        if begin > prev_end {
            return Err(IoError::Gap {
                path: path.to_path_buf(),
                tensor: name.clone(),
                expected: prev_end,
                begin,
            });
        }
        if end > begin || prev_name.is_none() {
            prev_name = Some(name.clone());
        }
        prev_end = end;
        out.push(Entry {
            info: entries[i].clone(),
            // In bounds of the mapped file, so these fit in usize.
            start: data_start + begin as usize,
            end: data_start + end as usize,
        });
    }
    if prev_end < data_len {
        return Err(IoError::TrailingBytes {
            path: path.to_path_buf(),
            extra: data_len - prev_end,
        });
    }
    Ok(Header {
        entries: out,
        metadata,
    })
}
