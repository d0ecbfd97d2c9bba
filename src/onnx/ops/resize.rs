//! ONNX ops, family: resampling. Resize (opsets 10-19: nearest, linear and cubic on any axes, every
//! coordinate transformation mode, nearest rounding modes, `exclude_outside`, `keep_aspect_ratio_policy`,
//! tf_crop_and_resize with its extrapolation value) and Upsample. Each axis is resampled as a sum of
//! gathered taps times weights, with candle ops, so gradients flow through it when a backbone is tuned.
//! `antialias = 1` is refused at load (see attrs.rs).

use candle_core::{DType, Device, Tensor};
use candle_onnx::onnx::NodeProto;

use super::*;
use crate::error::Result;

/// The op types this family evaluates.
pub const OPS: &[&str] = &["Resize", "Upsample"];

/// Evaluates `node` (one of [`OPS`]).
pub fn eval(node: &NodeProto, ins: &[Option<Tensor>], opset: i64, _device: &Device) -> Result<Vec<Tensor>> {
    let x = input(node, ins, 0)?;
    let spec = Spec::read(node, ins, opset, x.dims())?;
    Ok(vec![resize(node, x, &spec)?])
}

/// How output positions map back onto the input.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Coord {
    HalfPixel,
    HalfPixelSymmetric,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfCropAndResize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Nearest,
    Linear,
    Cubic,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rounding {
    PreferFloor,
    PreferCeil,
    Floor,
    Ceil,
}

/// A Resize node's resolved attributes and per-axis output sizes, scales and crop boxes.
struct Spec {
    mode: Mode,
    coord: Coord,
    rounding: Rounding,
    cubic_a: f64,
    exclude_outside: bool,
    extrapolation: f64,
    /// Per input axis: output length, scale (output / input), crop box start and end (tf_crop_and_resize).
    axes: Vec<(usize, f64, f64, f64)>,
}

fn pick<T: Copy>(node: &NodeProto, attr: &str, value: &str, table: &[(&str, T)]) -> Result<T> {
    table.iter().find(|(n, _)| *n == value).map(|(_, v)| *v).ok_or_else(|| {
        let known: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
        node_err(node, format!("attribute `{attr}` = \"{value}\" is not one of {known:?}"))
    })
}

/// A present, non-empty optional input (opset 11 passes empty tensors for absent roi/scales).
fn given(ins: &[Option<Tensor>], i: usize) -> Option<&Tensor> {
    opt_input(ins, i).filter(|t| t.elem_count() > 0)
}

impl Spec {
    fn read(node: &NodeProto, ins: &[Option<Tensor>], opset: i64, dims: &[usize]) -> Result<Spec> {
        let at = Attrs(node);
        let upsample = node.op_type == "Upsample";
        let mode = at.string("mode").unwrap_or_else(|| "nearest".into());
        let mode =
            pick(node, "mode", &mode, &[("nearest", Mode::Nearest), ("linear", Mode::Linear), ("cubic", Mode::Cubic)])?;
        // Upsample and Resize-10 have no coordinate attribute: asymmetric positions, nearest floors.
        let old = upsample || opset < 11;
        let coord = match at.string("coordinate_transformation_mode") {
            _ if old => Coord::Asymmetric,
            None => Coord::HalfPixel,
            Some(c) => pick(
                node,
                "coordinate_transformation_mode",
                &c,
                &[
                    ("half_pixel", Coord::HalfPixel),
                    ("half_pixel_symmetric", Coord::HalfPixelSymmetric),
                    ("pytorch_half_pixel", Coord::PytorchHalfPixel),
                    ("align_corners", Coord::AlignCorners),
                    ("asymmetric", Coord::Asymmetric),
                    ("tf_crop_and_resize", Coord::TfCropAndResize),
                ],
            )?,
        };
        let rounding = match at.string("nearest_mode") {
            _ if old => Rounding::Floor,
            None => Rounding::PreferFloor,
            Some(r) => pick(
                node,
                "nearest_mode",
                &r,
                &[
                    ("round_prefer_floor", Rounding::PreferFloor),
                    ("round_prefer_ceil", Rounding::PreferCeil),
                    ("floor", Rounding::Floor),
                    ("ceil", Rounding::Ceil),
                ],
            )?,
        };
        let axes = Self::axes(node, ins, opset, dims, coord)?;
        Ok(Spec {
            mode,
            coord,
            rounding,
            cubic_a: at.float("cubic_coeff_a", -0.75) as f64,
            exclude_outside: at.int("exclude_outside", 0) != 0,
            extrapolation: at.float("extrapolation_value", 0.0) as f64,
            axes,
        })
    }

    /// Output length, scale and crop box of every input axis, from scales or sizes (and `axes`).
    fn axes(
        node: &NodeProto,
        ins: &[Option<Tensor>],
        opset: i64,
        dims: &[usize],
        coord: Coord,
    ) -> Result<Vec<(usize, f64, f64, f64)>> {
        let at = Attrs(node);
        let r = dims.len();
        let axes: Vec<usize> = match at.ints("axes") {
            Some(a) => a.iter().map(|&a| norm_axis(node, a, r)).collect::<Result<_>>()?,
            None => (0..r).collect(),
        };
        let (scales, sizes, roi) = if node.op_type == "Upsample" && opset < 9 {
            (at.floats("scales"), None, None)
        } else if node.op_type == "Upsample" || opset < 11 {
            (Some(to_f64s(input(node, ins, 1)?)?.iter().map(|&v| v as f32).collect()), None, None)
        } else {
            let scales = given(ins, 2).map(to_f64s).transpose()?.map(|v| v.iter().map(|&s| s as f32).collect());
            (scales, given(ins, 3).map(to_i64s).transpose()?, given(ins, 1).map(to_f64s).transpose()?)
        };
        let n = axes.len();
        let mut out: Vec<(usize, f64, f64, f64)> = dims.iter().map(|&d| (d, 1.0, 0.0, 1.0)).collect();
        if let Some(roi) = roi.filter(|_| coord == Coord::TfCropAndResize) {
            if roi.len() != 2 * n {
                return Err(node_err(node, format!("roi has {} values, expected {} for {n} axes", roi.len(), 2 * n)));
            }
            for (i, &a) in axes.iter().enumerate() {
                (out[a].2, out[a].3) = (roi[i], roi[i + n]);
            }
        }
        match (scales, sizes) {
            (Some(s), None) => {
                if s.len() != n || s.iter().any(|&v| v.is_nan() || v <= 0.0) {
                    return Err(node_err(node, format!("scales {s:?}: expected {n} positive values")));
                }
                for (i, &a) in axes.iter().enumerate() {
                    out[a].0 = (dims[a] as f64 * s[i] as f64).floor() as usize;
                    out[a].1 = s[i] as f64;
                }
            }
            (None, Some(z)) => {
                if z.len() != n || z.iter().any(|&v| v < 0) {
                    return Err(node_err(node, format!("sizes {z:?}: expected {n} non-negative values")));
                }
                let ratio = |i: usize| z[i] as f64 / dims[axes[i]].max(1) as f64;
                let policy = at.string("keep_aspect_ratio_policy").unwrap_or_else(|| "stretch".into());
                let common = match policy.as_str() {
                    "stretch" => None,
                    "not_larger" => Some((0..n).map(ratio).fold(f64::INFINITY, f64::min)),
                    "not_smaller" => Some((0..n).map(ratio).fold(0.0, f64::max)),
                    p => return Err(node_err(node, format!("keep_aspect_ratio_policy \"{p}\" is not known"))),
                };
                for (i, &a) in axes.iter().enumerate() {
                    out[a] = match common {
                        None => (z[i] as usize, ratio(i), out[a].2, out[a].3),
                        Some(s) => ((s * dims[a] as f64 + 0.5).floor() as usize, s, out[a].2, out[a].3),
                    };
                }
            }
            _ => return Err(node_err(node, "exactly one of scales and sizes must be given")),
        }
        Ok(out)
    }
}

/// The input coordinate of output position `o` on an axis of `len` inputs and `out` outputs.
/// The output length in these formulas is `scale * len`, unrounded, as in the spec's reference.
fn source(coord: Coord, o: usize, len: usize, out: usize, scale: f64, (start, end): (f64, f64)) -> f64 {
    let (o, len_f, out_f) = (o as f64, len as f64, scale * len as f64);
    match coord {
        Coord::HalfPixel => (o + 0.5) / scale - 0.5,
        Coord::HalfPixelSymmetric => {
            let adjust = out as f64 / out_f;
            len_f / 2.0 * (1.0 - adjust) + (o + 0.5) / scale - 0.5
        }
        Coord::PytorchHalfPixel if out_f != 1.0 => (o + 0.5) / scale - 0.5,
        Coord::PytorchHalfPixel => -0.5,
        Coord::AlignCorners if out_f != 1.0 => o * (len_f - 1.0) / (out_f - 1.0),
        Coord::AlignCorners => 0.0,
        Coord::Asymmetric => o / scale,
        Coord::TfCropAndResize if out_f != 1.0 => {
            start * (len_f - 1.0) + o * (end - start) * (len_f - 1.0) / (out_f - 1.0)
        }
        Coord::TfCropAndResize => 0.5 * (start + end) * (len_f - 1.0),
    }
}

fn cubic(t: f64, a: f64) -> [f64; 4] {
    let far = |d: f64| ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a;
    let near = |d: f64| ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// The taps of one output position: (input index, weight) pairs, and whether it lies inside the input.
fn taps(spec: &Spec, x: f64, len: usize) -> (Vec<(usize, f64)>, bool) {
    let inside = spec.coord != Coord::TfCropAndResize || (0.0..=(len as f64 - 1.0)).contains(&x);
    let last = len as i64 - 1;
    let clamp = |i: i64| i.clamp(0, last) as usize;
    let base = x.floor();
    let t = x - base;
    let b = base as i64;
    let raw: Vec<(i64, f64)> = match spec.mode {
        Mode::Nearest => {
            let i = match spec.rounding {
                Rounding::PreferFloor if t == 0.5 => b,
                Rounding::PreferCeil if t == 0.5 => b + 1,
                Rounding::PreferFloor | Rounding::PreferCeil => x.round() as i64,
                Rounding::Floor => b,
                Rounding::Ceil => x.ceil() as i64,
            };
            vec![(i, 1.0)]
        }
        Mode::Linear => vec![(b, 1.0 - t), (b + 1, t)],
        Mode::Cubic => cubic(t, spec.cubic_a).iter().enumerate().map(|(k, &w)| (b - 1 + k as i64, w)).collect(),
    };
    let mut taps: Vec<(i64, f64)> = raw;
    if spec.exclude_outside {
        taps.retain(|&(i, _)| (0..=last).contains(&i));
        let sum: f64 = taps.iter().map(|t| t.1).sum();
        if sum != 0.0 {
            taps.iter_mut().for_each(|t| t.1 /= sum);
        }
    }
    (taps.into_iter().map(|(i, w)| (clamp(i), w)).collect(), inside)
}

/// Resamples one axis: the sum over tap k of `x[idx_k] * w_k`, then the crop box's extrapolation mask.
fn resize_axis(spec: &Spec, x: &Tensor, axis: usize) -> Result<(Tensor, Option<Tensor>)> {
    let (out, scale, start, end) = spec.axes[axis];
    let len = x.dims()[axis];
    let per: Vec<(Vec<(usize, f64)>, bool)> =
        (0..out).map(|o| taps(spec, source(spec.coord, o, len, out, scale, (start, end)), len)).collect();
    let width = per.iter().map(|p| p.0.len()).max().unwrap_or(1);
    let mut shape = vec![1; x.rank()];
    shape[axis] = out;
    let dev = x.device();
    let mut y: Option<Tensor> = None;
    for k in 0..width {
        let idx: Vec<u32> = per.iter().map(|p| p.0.get(k).map_or(0, |t| t.0 as u32)).collect();
        let w: Vec<f32> = per.iter().map(|p| p.0.get(k).map_or(0.0, |t| t.1 as f32)).collect();
        let g = x.index_select(&Tensor::from_vec(idx, out, dev)?, axis)?;
        let term = match spec.mode {
            Mode::Nearest => g,
            _ => g.broadcast_mul(&Tensor::from_vec(w, shape.as_slice(), dev)?.to_dtype(x.dtype())?)?,
        };
        y = Some(match y {
            Some(y) => (y + term)?,
            None => term,
        });
    }
    let mask = if per.iter().all(|p| p.1) {
        None
    } else {
        let m: Vec<f32> = per.iter().map(|p| if p.1 { 1.0 } else { 0.0 }).collect();
        Some(Tensor::from_vec(m, shape.as_slice(), dev)?)
    };
    let y = y.ok_or_else(|| crate::error::Error::onnx("Resize", "no taps"))?;
    Ok((y, mask))
}

fn resize(node: &NodeProto, x: &Tensor, spec: &Spec) -> Result<Tensor> {
    if spec.mode != Mode::Nearest && !matches!(x.dtype(), DType::F32 | DType::F64) {
        return Err(node_err(
            node,
            format!("{:?} interpolation needs a float input, found {:?}", spec.mode, x.dtype()),
        ));
    }
    if spec.axes.iter().zip(x.dims()).any(|(a, &d)| d == 0 && a.0 > 0) {
        return Err(node_err(node, format!("cannot resize the empty input {:?}", x.dims())));
    }
    let mut y = x.contiguous()?;
    let mut inside: Option<Tensor> = None;
    for axis in 0..x.rank() {
        let (out, scale, start, end) = spec.axes[axis];
        let whole = spec.coord != Coord::TfCropAndResize || (start, end) == (0.0, 1.0);
        if out == y.dims()[axis] && scale == 1.0 && whole {
            continue; // the identity on this axis
        }
        let (next, mask) = resize_axis(spec, &y, axis)?;
        y = next;
        inside = match (inside, mask) {
            (Some(a), Some(b)) => Some(a.broadcast_mul(&b)?),
            (a, b) => a.or(b),
        };
    }
    match inside {
        None => Ok(y),
        Some(m) => {
            let m = m.to_dtype(y.dtype())?;
            let outside = (m.ones_like()? - &m)?;
            Ok(y.broadcast_mul(&m)?.broadcast_add(&(outside * spec.extrapolation)?)?)
        }
    }
}
