//! Conversion between ONNX `TensorProto`s and candle tensors, validating sizes against dims so a
//! malformed file is an error, never a panic or an oversized allocation.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path};

use candle_core::{DType, Device, Tensor};
use candle_onnx::onnx::{tensor_proto::DataType, TensorProto};

use crate::error::{Error, Result};

fn bad(name: &str, msg: String) -> Error {
    Error::Shape { name: name.to_string(), msg }
}

/// A tensor's dims and element count, refusing negative dims and sizes over 2^34 elements.
fn checked_dims(t: &TensorProto) -> Result<(Vec<usize>, usize)> {
    let mut dims = Vec::with_capacity(t.dims.len());
    let mut numel: usize = 1;
    for &d in &t.dims {
        if d < 0 {
            return Err(bad(&t.name, format!("negative dimension {d} in dims {:?}", t.dims)));
        }
        numel = numel
            .checked_mul(d as usize)
            .filter(|&n| n <= (1usize << 34))
            .ok_or_else(|| bad(&t.name, format!("dims {:?} are too large", t.dims)))?;
        dims.push(d as usize);
    }
    Ok((dims, numel))
}

/// Converts an ONNX tensor to a candle tensor on `device` (float16/bfloat16 become f32, int32/int8/int16
/// become i64, bool becomes u8).
pub fn from_proto(t: &TensorProto, device: &Device) -> Result<Tensor> {
    let name = t.name.as_str();
    if t.data_location == 1 {
        return Err(bad(
            name,
            "stored as external data, which is only read when the model is loaded from a file (its folder holds the data)"
                .into(),
        ));
    }
    let (dims, numel) = checked_dims(t)?;
    let dt = DataType::try_from(t.data_type).map_err(|_| bad(name, format!("unknown data type {}", t.data_type)))?;
    let raw = t.raw_data.as_slice();
    let check_raw = |width: usize| -> Result<()> {
        if raw.len() != numel * width {
            Err(bad(
                name,
                format!("holds {} bytes of data but dims {:?} need {} bytes", raw.len(), t.dims, numel * width),
            ))
        } else {
            Ok(())
        }
    };
    let check_len = |len: usize| -> Result<()> {
        if len != numel {
            Err(bad(name, format!("holds {len} values but dims {:?} need {numel}", t.dims)))
        } else {
            Ok(())
        }
    };
    let tensor = match dt {
        DataType::Float => {
            if !t.float_data.is_empty() || raw.is_empty() {
                check_len(t.float_data.len())?;
                Tensor::from_slice(&t.float_data, dims.as_slice(), device)?
            } else {
                check_raw(4)?;
                let v: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                Tensor::from_vec(v, dims.as_slice(), device)?
            }
        }
        DataType::Double => {
            let v: Vec<f64> = if !t.double_data.is_empty() || raw.is_empty() {
                check_len(t.double_data.len())?;
                t.double_data.clone()
            } else {
                check_raw(8)?;
                raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
            };
            Tensor::from_vec(v, dims.as_slice(), device)?
        }
        DataType::Int64 => {
            let v: Vec<i64> = if !t.int64_data.is_empty() || raw.is_empty() {
                check_len(t.int64_data.len())?;
                t.int64_data.clone()
            } else {
                check_raw(8)?;
                raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
            };
            Tensor::from_vec(v, dims.as_slice(), device)?
        }
        DataType::Int32 | DataType::Int16 | DataType::Int8 | DataType::Uint16 => {
            let v: Vec<i64> = if !t.int32_data.is_empty() || raw.is_empty() {
                check_len(t.int32_data.len())?;
                t.int32_data.iter().map(|&x| x as i64).collect()
            } else {
                match dt {
                    DataType::Int32 => {
                        check_raw(4)?;
                        raw.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()
                    }
                    DataType::Int16 => {
                        check_raw(2)?;
                        raw.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as i64).collect()
                    }
                    DataType::Uint16 => {
                        check_raw(2)?;
                        raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as i64).collect()
                    }
                    _ => {
                        check_raw(1)?;
                        raw.iter().map(|&b| b as i8 as i64).collect()
                    }
                }
            };
            Tensor::from_vec(v, dims.as_slice(), device)?
        }
        // Widened to int64; a uint64 above int64's range is refused rather than wrapped.
        DataType::Uint32 | DataType::Uint64 => {
            Tensor::from_vec(unsigned(t, dt == DataType::Uint32, &check_len, &check_raw)?, dims.as_slice(), device)?
        }
        DataType::Uint8 | DataType::Bool => {
            let v: Vec<u8> = if !t.int32_data.is_empty() || raw.is_empty() {
                check_len(t.int32_data.len())?;
                t.int32_data.iter().map(|&x| x as u8).collect()
            } else {
                check_raw(1)?;
                raw.to_vec()
            };
            Tensor::from_vec(v, dims.as_slice(), device)?
        }
        DataType::Float16 | DataType::Bfloat16 => {
            let v: Vec<f32> = if !t.int32_data.is_empty() || raw.is_empty() {
                check_len(t.int32_data.len())?;
                t.int32_data.iter().map(|&x| half_to_f32(x as u16, dt)).collect()
            } else {
                check_raw(2)?;
                raw.chunks_exact(2).map(|c| half_to_f32(u16::from_le_bytes([c[0], c[1]]), dt)).collect()
            };
            Tensor::from_vec(v, dims.as_slice(), device)?
        }
        other => return Err(bad(name, format!("data type {other:?} is not supported"))),
    };
    Ok(tensor)
}

/// uint32/uint64 values widened to int64; a uint64 above int64's range is refused rather than wrapped.
fn unsigned(
    t: &TensorProto,
    u32s: bool,
    check_len: &dyn Fn(usize) -> Result<()>,
    check_raw: &dyn Fn(usize) -> Result<()>,
) -> Result<Vec<i64>> {
    let raw = t.raw_data.as_slice();
    let v: Vec<u64> = if !t.uint64_data.is_empty() || raw.is_empty() {
        check_len(t.uint64_data.len())?;
        t.uint64_data.clone()
    } else if u32s {
        check_raw(4)?;
        raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64).collect()
    } else {
        check_raw(8)?;
        raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
    };
    let v: Option<Vec<i64>> = v.iter().map(|&x| i64::try_from(x).ok()).collect();
    v.ok_or_else(|| bad(&t.name, "a uint64 value exceeds int64's range".into()))
}

fn half_to_f32(bits: u16, dt: DataType) -> f32 {
    if dt == DataType::Bfloat16 {
        return f32::from_bits((bits as u32) << 16);
    }
    let sign = ((bits >> 15) as u32) << 31;
    let exp = ((bits >> 10) & 0x1f) as u32;
    let frac = (bits & 0x3ff) as u32;
    let v = match exp {
        0 => {
            // Subnormal: value = frac * 2^-24.
            let f = frac as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -f } else { f };
        }
        31 => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(v)
}

/// The ONNX data type code of a candle dtype.
pub fn onnx_dtype(dt: DType) -> i32 {
    match dt {
        DType::F32 => DataType::Float as i32,
        DType::F64 => DataType::Double as i32,
        DType::I64 => DataType::Int64 as i32,
        DType::U8 => DataType::Uint8 as i32,
        DType::U32 => DataType::Uint32 as i32,
        DType::F16 => DataType::Float16 as i32,
        DType::BF16 => DataType::Bfloat16 as i32,
        _ => DataType::Undefined as i32,
    }
}

/// A float32 candle tensor as an ONNX initializer named `name` (raw little-endian data).
pub fn f32_to_proto(name: &str, t: &Tensor) -> Result<TensorProto> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut raw = Vec::with_capacity(v.len() * 4);
    for x in v {
        raw.extend_from_slice(&x.to_le_bytes());
    }
    Ok(TensorProto {
        name: name.to_string(),
        dims: t.dims().iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: raw,
        ..Default::default()
    })
}

/// The candle dtype for an ONNX `to` code (Cast), or None when unsupported.
pub fn dtype_of_code(code: i64) -> Option<DType> {
    match DataType::try_from(code as i32).ok()? {
        DataType::Float | DataType::Float16 | DataType::Bfloat16 => Some(DType::F32),
        DataType::Double => Some(DType::F64),
        DataType::Int64
        | DataType::Int32
        | DataType::Int16
        | DataType::Int8
        | DataType::Uint16
        | DataType::Uint32
        | DataType::Uint64 => Some(DType::I64),
        DataType::Uint8 | DataType::Bool => Some(DType::U8),
        _ => None,
    }
}

/// Reads the bytes of an initializer stored as external data (`data_location` EXTERNAL) into `raw_data`,
/// so the rest of automm (and exports) sees an ordinary tensor. The file must lie inside `model_dir`
/// (relative location, no `..`, no symlink leading out) and `offset`/`length` must lie inside the file.
/// Errors are messages naming the tensor and the location.
pub fn inline_external_data(t: &mut TensorProto, model_dir: &Path) -> std::result::Result<(), String> {
    if t.data_location != 1 {
        return Ok(());
    }
    let name = t.name.clone();
    let get = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.clone());
    let loc = get("location").ok_or_else(|| format!("tensor `{name}`: external data without a `location`"))?;
    let num = |k: &str| -> std::result::Result<Option<u64>, String> {
        get(k)
            .map(|v| {
                v.trim().parse::<u64>().map_err(|_| format!("tensor `{name}`: external `{k}` `{v}` is not a number"))
            })
            .transpose()
    };
    let (offset, length) = (num("offset")?.unwrap_or(0), num("length")?);
    let rel = Path::new(&loc);
    if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(format!(
            "tensor `{name}`: external data location `{loc}` must be a relative path inside the model folder"
        ));
    }
    let outside = || format!("tensor `{name}`: external data `{loc}` resolves outside the model folder");
    let root = std::fs::canonicalize(model_dir).map_err(|e| format!("model folder {}: {e}", model_dir.display()))?;
    let file = std::fs::canonicalize(model_dir.join(rel))
        .map_err(|e| format!("tensor `{name}`: external data file `{loc}`: {e}"))?;
    if !file.starts_with(&root) {
        return Err(outside());
    }
    let mut f = std::fs::File::open(&file).map_err(|e| format!("tensor `{name}`: external data file `{loc}`: {e}"))?;
    let size = f.metadata().map_err(|e| format!("tensor `{name}`: {e}"))?.len();
    let length = length.unwrap_or(size.saturating_sub(offset));
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(format!(
            "tensor `{name}`: external data `{loc}` offset {offset} + length {length} is past the file's {size} bytes"
        ));
    }
    let mut buf = vec![0u8; length as usize];
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut buf))
        .map_err(|e| format!("tensor `{name}`: {e}"))?;
    t.raw_data = buf;
    t.data_location = 0;
    t.external_data.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_size_mismatch_is_an_error() {
        let t = TensorProto {
            name: "w".into(),
            dims: vec![2, 3],
            data_type: DataType::Float as i32,
            raw_data: vec![0; 20],
            ..Default::default()
        };
        let e = from_proto(&t, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("`w`") && e.contains("24 bytes"), "{e}");
    }

    #[test]
    fn halves_convert() {
        assert_eq!(half_to_f32(0x3c00, DataType::Float16), 1.0);
        assert_eq!(half_to_f32(0xc000, DataType::Float16), -2.0);
        assert_eq!(half_to_f32(0x3f80, DataType::Bfloat16), 1.0);
    }
}
