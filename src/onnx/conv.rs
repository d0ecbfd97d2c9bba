//! 2-D convolution for the importer: padding rules (explicit, SAME_UPPER/LOWER), candle's conv2d for
//! dense and grouped convs, and a direct kernel for depthwise convs, which candle runs as one conv per
//! channel (about 100x slower than ONNX Runtime on MobileNet-style blocks).

use candle_core::{DType, Device, Tensor};
use candle_onnx::onnx::NodeProto;
use rayon::prelude::*;

use super::ops::{node_err, pad_spatial, Attrs};
use crate::error::Result;

/// ONNX Conv on an NCHW tensor.
pub fn conv(node: &NodeProto, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let at = Attrs(node);
    if x.rank() != 4 || w.rank() != 4 {
        return Err(node_err(
            node,
            format!("only 2-D convolution is supported; input {:?}, weight {:?}", x.dims(), w.dims()),
        ));
    }
    let (_, c, h, wd) = x.dims4()?;
    let (m, cg, kh, kw) = w.dims4()?;
    let group = at.int("group", 1).max(1) as usize;
    if cg * group != c || m % group != 0 {
        return Err(node_err(
            node,
            format!("weight {:?} with group {group} does not fit input {:?}", w.dims(), x.dims()),
        ));
    }
    let strides = at.ints("strides").unwrap_or(vec![1, 1]);
    let dil = at.ints("dilations").unwrap_or(vec![1, 1]);
    if strides.len() != 2 || dil.len() != 2 || strides.iter().chain(&dil).any(|&v| v < 1) {
        return Err(node_err(node, "strides and dilations must be two positive numbers"));
    }
    let (sh, sw) = (strides[0] as usize, strides[1] as usize);
    let (dh, dw) = (dil[0] as usize, dil[1] as usize);
    let auto = at.string("auto_pad").unwrap_or_else(|| "NOTSET".into());
    let pads: Vec<i64> = match auto.as_str() {
        "SAME_UPPER" | "SAME_LOWER" => {
            let same = |inp: usize, k: usize, s: usize, d: usize| {
                let out = inp.div_ceil(s);
                let total = ((out - 1) * s + (k - 1) * d + 1).saturating_sub(inp) as i64;
                let small = total / 2;
                if auto == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                }
            };
            let (t, bm) = same(h, kh, sh, dh);
            let (l, r) = same(wd, kw, sw, dw);
            vec![t, l, bm, r]
        }
        "VALID" => vec![0; 4],
        _ => at.ints("pads").unwrap_or(vec![0; 4]),
    };
    if pads.len() != 4 || pads.iter().any(|&p| p < 0) {
        return Err(node_err(node, format!("pads {pads:?}: expected 4 non-negative values")));
    }
    let depthwise = group == c && group == m && cg == 1;
    let y = if depthwise && x.device().is_cpu() && x.dtype() == DType::F32 {
        depthwise_cpu(x, w, &pads, (sh, sw), (dh, dw))?
    } else {
        // candle's conv2d takes one symmetric padding for both dims; otherwise pad explicitly.
        let (xp, p) = if pads.iter().all(|&p| p == pads[0]) {
            (x.clone(), pads[0] as usize)
        } else {
            (pad_spatial(x, &pads, 0.0)?, 0)
        };
        if sh != sw || dh != dw {
            return Err(node_err(node, "different strides or dilations per axis are not supported"));
        }
        xp.contiguous()?.conv2d(&w.contiguous()?, p, sh, dh, group)?
    };
    match b {
        Some(b) => Ok(y.broadcast_add(&b.reshape((1, m, 1, 1))?)?),
        None => Ok(y),
    }
}

/// Depthwise convolution (one filter per channel) computed directly, one (image, channel) plane per task.
fn depthwise_cpu(x: &Tensor, w: &Tensor, pads: &[i64], s: (usize, usize), d: (usize, usize)) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (_, _, kh, kw) = w.dims4()?;
    let (pt, pl) = (pads[0] as isize, pads[1] as isize);
    let oh = (h + pads[0] as usize + pads[2] as usize).saturating_sub((kh - 1) * d.0 + 1) / s.0 + 1;
    let ow = (wd + pads[1] as usize + pads[3] as usize).saturating_sub((kw - 1) * d.1 + 1) / s.1 + 1;
    let xv: Vec<f32> = x.contiguous()?.flatten_all()?.to_vec1()?;
    let wv: Vec<f32> = w.contiguous()?.flatten_all()?.to_vec1()?;
    let mut out = vec![0f32; n * c * oh * ow];
    out.par_chunks_mut(oh * ow).enumerate().for_each(|(plane, o)| {
        let ch = plane % c;
        let src = &xv[plane * h * wd..(plane + 1) * h * wd];
        let k = &wv[ch * kh * kw..(ch + 1) * kh * kw];
        for i in 0..kh {
            for j in 0..kw {
                let wij = k[i * kw + j];
                let dy = (i * d.0) as isize - pt;
                let dx = (j * d.1) as isize - pl;
                // Output columns whose input column lies inside the image.
                let x_lo = if dx < 0 { ((-dx) as usize).div_ceil(s.1) } else { 0 };
                let x_hi =
                    if (wd as isize - dx) <= 0 { 0 } else { ((wd as isize - dx) as usize).div_ceil(s.1).min(ow) };
                if x_lo >= x_hi {
                    continue;
                }
                for oy in 0..oh {
                    let iy = (oy * s.0) as isize + dy;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let row = &src[iy as usize * wd..(iy as usize + 1) * wd];
                    let orow = &mut o[oy * ow..(oy + 1) * ow];
                    if s.1 == 1 {
                        let off = dx + x_lo as isize;
                        let src_row = &row[off as usize..off as usize + (x_hi - x_lo)];
                        for (dst, &v) in orow[x_lo..x_hi].iter_mut().zip(src_row) {
                            *dst += wij * v;
                        }
                    } else {
                        for (ox, dst) in orow.iter_mut().enumerate().take(x_hi).skip(x_lo) {
                            let ix = (ox * s.1) as isize + dx;
                            *dst += wij * row[ix as usize];
                        }
                    }
                }
            }
        }
    });
    Ok(Tensor::from_vec(out, (n, c, oh, ow), &Device::Cpu)?)
}
