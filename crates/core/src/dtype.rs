//! Element types of checkpoint tensors.

use std::fmt;
use std::str::FromStr;

use crate::CoreError;

/// The element type of a stored tensor.
///
/// Spelled as in the safetensors header (`"F32"`, `"BF16"`, ...). Parsing also
/// accepts PyTorch's names (`"float32"`, `"bfloat16"`, `"torch.float16"`, ...)
/// so that a `torch_dtype` from `config.json` or a mergekit `dtype:` key can be
/// read directly.
///
/// ```
/// use tensormerge_core::DType;
/// let d: DType = "bfloat16".parse().unwrap();
/// assert_eq!(d, DType::BF16);
/// assert_eq!(d.as_str(), "BF16");
/// assert_eq!(d.torch_name(), "bfloat16");
/// assert!(d.is_float());
/// assert_eq!(DType::I64.size_in_bytes(), 8);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// 64-bit IEEE float.
    F64,
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 64-bit integer.
    U64,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 16-bit integer.
    U16,
    /// Unsigned 8-bit integer.
    U8,
    /// Boolean, one byte per element.
    Bool,
}

impl DType {
    /// Every dtype, floats first.
    pub const ALL: [DType; 13] = [
        DType::F64,
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U64,
        DType::U32,
        DType::U16,
        DType::U8,
        DType::Bool,
    ];

    /// The safetensors spelling (`"F32"`, `"BF16"`, `"BOOL"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U64 => "U64",
            DType::U32 => "U32",
            DType::U16 => "U16",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// The PyTorch spelling used by `config.json`'s `torch_dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U64 => "uint64",
            DType::U32 => "uint32",
            DType::U16 => "uint16",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }

    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Whether tensors of this type are merged (floating point). Other tensors
    /// (position ids, masks) are carried through from the base model.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DType {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let t = t.strip_prefix("torch.").unwrap_or(t);
        for d in DType::ALL {
            if t.eq_ignore_ascii_case(d.as_str()) || t.eq_ignore_ascii_case(d.torch_name()) {
                return Ok(d);
            }
        }
        let alias = match t.to_ascii_lowercase().as_str() {
            "half" | "fp16" => Some(DType::F16),
            "float" | "fp32" => Some(DType::F32),
            "double" | "fp64" => Some(DType::F64),
            "bf16" => Some(DType::BF16),
            "long" => Some(DType::I64),
            "int" => Some(DType::I32),
            _ => None,
        };
        alias.ok_or_else(|| CoreError::UnknownDType(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_both_spellings() {
        for d in DType::ALL {
            assert_eq!(d.as_str().parse::<DType>().unwrap(), d);
            assert_eq!(d.torch_name().parse::<DType>().unwrap(), d);
            assert_eq!(d.to_string().parse::<DType>().unwrap(), d);
        }
        assert_eq!("torch.bfloat16".parse::<DType>().unwrap(), DType::BF16);
        assert!(
            matches!("F8_E4M3".parse::<DType>(), Err(CoreError::UnknownDType(s)) if s == "F8_E4M3")
        );
    }
}
