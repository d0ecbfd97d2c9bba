//! Channel-blocked activations in CPU inference plans: which steps keep their output as NCHWc
//! (`[n, c/8, h, w, 8]`, see `kernels::nchwc`), and how those steps run.
//!
//! A chain of convolutions stays blocked from the stem to the global pool, with what joins them running on
//! the blocked data as it is: residual Adds, elementwise activations, squeeze-excite gates, inference
//! BatchNormalization, channel Concats and Max/AveragePool. Any other reader of a blocked value gets it
//! back as NCHW, so a plan is correct whatever the graph; blocking only changes speed. Plans that track
//! gradients never block (the blocked kernels have no backward pass).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};
use candle_onnx::onnx::NodeProto;

use super::fuse::Fused;
use super::kernels::{self, nchwc, Isa};
use super::ops::{self, conv};
use super::ops::{node_err, Attrs};
use crate::error::Result;

const LANES: usize = nchwc::LANES;

/// The blocked part of a plan.
#[derive(Default)]
pub(crate) struct Blocked {
    /// Steps (node indices) whose result is stored blocked.
    pub steps: HashSet<usize>,
    /// Values stored blocked.
    pub values: HashSet<String>,
    /// Steps that are a spatial mean of a blocked value ([`spatial_mean`]), run by [`global_avg_pool`]
    /// on the blocked data (decided here, once, not per run).
    pub means: HashSet<usize>,
    /// Packed weights of convs whose weight is a plan constant, by node index.
    packed: Mutex<HashMap<usize, Arc<Vec<f32>>>>,
}

/// The value a step produces (the last node's output for a fused pattern).
fn step_output(node: &NodeProto, fused: Option<&Fused>) -> Option<String> {
    match fused {
        Some(Fused::ConvAct { out, .. } | Fused::Silu { out }) => Some(out.clone()),
        Some(_) => None,
        None => node.output.first().cloned(),
    }
}

/// Whether a Conv node, by its static weight and attributes, has a blocked kernel: a dense or grouped conv
/// of any geometry whose groups have whole blocks of input and output channels ([`nchwc::dense_blocked`];
/// 1x1 stride-1 unpadded dense ones on [`nchwc::pointwise`]) or a depthwise conv.
fn native(node: &NodeProto, statics: &HashMap<String, Tensor>) -> bool {
    let Some(w) = node.input.get(1).and_then(|n| statics.get(n)) else { return false };
    if node.op_type != "Conv" || w.rank() != 4 || w.dtype() != DType::F32 {
        return false;
    }
    let (m, cg, kh) = (w.dims()[0], w.dims()[1], w.dims()[2]);
    let group = Attrs(node).int("group", 1).max(1) as usize;
    let depthwise = cg == 1 && group == m && kh <= 16;
    let dense = m.is_multiple_of(group) && cg.is_multiple_of(LANES) && (m / group).is_multiple_of(LANES);
    (dense || depthwise) && m.is_multiple_of(LANES) && (cg * group).is_multiple_of(LANES)
}

/// Chooses the blocked steps among `steps` (in order). A native conv is blocked; another conv with whole
/// output blocks (a stem) is blocked when every reader of its output takes blocked data ([`takes_blocked`]:
/// it is then written blocked); elementwise ops are blocked when all their data inputs are, an Add or Mul
/// also when one is and the other has the output's shape or is a per-channel `[n, c, 1, 1]` gate, in whole
/// channel blocks (re-laid once); pools and an inference BatchNormalization when their input is; a channel
/// Concat when one input is and every input has whole channel blocks (DenseNet). `shapes` holds every value's dims for this input. Graph
/// outputs stay NCHW.
pub(crate) fn plan(
    nodes: &[NodeProto],
    steps: &[usize],
    fused: &HashMap<usize, Fused>,
    statics: &HashMap<String, Tensor>,
    shapes: &HashMap<String, Vec<usize>>,
    outputs: &[String],
) -> Blocked {
    let whole_blocks = |v: &str| shapes.get(v).is_some_and(|d| d.len() == 4 && d[1].is_multiple_of(LANES));
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    for &i in steps {
        for v in &nodes[i].input {
            readers.entry(v.as_str()).or_default().push(i);
        }
    }
    // An operand of `out`'s own shape, or `[n, c, 1, 1]` against `[n, c, h, w]` (both 4-D).
    let fits_output = |v: &str, out: &str| match (shapes.get(v), shapes.get(out)) {
        (Some(d), Some(o)) => d == o || (d.len() == 4 && o.len() == 4 && d[..2] == o[..2] && d[2..] == [1, 1]),
        _ => false,
    };
    let reads_blocked = |j: usize| takes_blocked(&nodes[j], statics);
    let mut b = Blocked::default();
    for &i in steps {
        let n = &nodes[i];
        let Some(out) = step_output(n, fused.get(&i)) else { continue };
        if outputs.contains(&out) {
            continue;
        }
        let data_inputs = || n.input.iter().filter(|v| !v.is_empty() && !statics.contains_key(*v));
        let block = match n.op_type.as_str() {
            "Conv" if native(n, statics) => true,
            "Conv" => {
                let w = n.input.get(1).and_then(|v| statics.get(v));
                w.is_some_and(|w| w.rank() == 4 && w.dims()[0] % LANES == 0 && w.dtype() == DType::F32)
                    && readers.get(out.as_str()).is_some_and(|r| r.iter().all(|&j| reads_blocked(j)))
            }
            // One blocked operand, the other NCHW of the output's own shape or a per-channel `[n, c, 1, 1]`
            // (a squeeze-excite gate): it is re-laid.
            "Add" | "Mul"
                if fused.get(&i).is_none()
                    && data_inputs().count() == 2
                    && data_inputs().any(|v| b.values.contains(v))
                    && data_inputs().all(|v| whole_blocks(v) && fits_output(v, &out)) =>
            {
                true
            }
            // Elementwise: the same op on blocked data. Two blocked operands broadcast in blocked form
            // exactly as in NCHW ([n, c/8, 1, 1, 8] against [n, c/8, h, w, 8] is a per-channel scale).
            op if ELEMENTWISE.contains(&op) => {
                fused.get(&i).is_none_or(|f| matches!(f, Fused::Silu { .. }))
                    && data_inputs().count() > 0
                    && data_inputs().all(|v| b.values.contains(v))
                    // Clip's bounds must be scalars (they are; blocked data would not broadcast otherwise).
                    && n.input.iter().skip(1).all(|v| v.is_empty() || statics.get(v).is_none_or(|t| t.elem_count() == 1))
                    && (!matches!(n.op_type.as_str(), "Add" | "Mul") || data_inputs().count() == 2)
            }
            "MaxPool" | "AveragePool" => {
                n.input.first().is_some_and(|v| b.values.contains(v))
                    && shapes.get(&n.input[0]).is_some_and(|d| d.len() == 4)
                    && n.output.iter().skip(1).all(String::is_empty)
            }
            "BatchNormalization" => {
                fused.get(&i).is_none()
                    && n.input.first().is_some_and(|v| b.values.contains(v))
                    && n.input.iter().skip(1).all(|v| statics.contains_key(v))
                    && Attrs(n).int("training_mode", 0) == 0
                    && n.output.iter().skip(1).all(String::is_empty)
            }
            "Concat" => {
                let axis = Attrs(n).int("axis", 0);
                (axis == 1 || axis == -3)
                    && data_inputs().count() == n.input.len()
                    && data_inputs().any(|v| b.values.contains(v))
                    && data_inputs().all(|v| whole_blocks(v))
            }
            _ => false,
        };
        if block {
            b.steps.insert(i);
            b.values.insert(out);
        } else if fused.get(&i).is_none()
            && n.input.first().is_some_and(|v| b.values.contains(v))
            && spatial_mean(n, statics)
        {
            b.means.insert(i);
        }
    }
    b
}

/// Whether `node` takes blocked data as it is: a blocked conv, a spatial mean, or an op that runs blocked
/// when its inputs are (elementwise ops, pools, BatchNormalization, Concat; a stem's residual Add).
fn takes_blocked(node: &NodeProto, statics: &HashMap<String, Tensor>) -> bool {
    let op = node.op_type.as_str();
    native(node, statics)
        || spatial_mean(node, statics)
        || ELEMENTWISE.contains(&op)
        || matches!(op, "MaxPool" | "AveragePool" | "BatchNormalization" | "Concat")
}

/// The elementwise ops that run on blocked data as they are (same layout on every operand).
const ELEMENTWISE: [&str; 8] = ["Add", "Mul", "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish"];

/// Whether `node` is a mean over the spatial axes of an NCHW value: GlobalAveragePool, or ReduceMean over
/// axes {2, 3} (attribute or static input) keeping dims, as timm's squeeze-excite blocks export it. Both
/// read a blocked value directly ([`global_avg_pool`]).
fn spatial_mean(node: &NodeProto, statics: &HashMap<String, Tensor>) -> bool {
    match node.op_type.as_str() {
        "GlobalAveragePool" => true,
        "ReduceMean" => {
            let at = Attrs(node);
            let axes = match node.input.get(1).filter(|v| !v.is_empty()) {
                Some(v) => statics.get(v).and_then(|t| ops::to_i64s(t).ok()),
                None => at.ints("axes"),
            };
            let spatial = axes.is_some_and(|mut a| {
                a.iter_mut().for_each(|x| *x = if *x < 0 { *x + 4 } else { *x });
                a.sort_unstable();
                a == [2, 3]
            });
            spatial && at.int("keepdims", 1) == 1
        }
        _ => false,
    }
}

/// `[n, c, h, w]` as blocked `[n, c/8, h, w, 8]`.
pub(crate) fn to_blocked(t: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = t.dims4()?;
    if kernels::usable(&[t]) {
        let v = kernels::with_data(t, |x| nchwc::block(x, n, c, h * w))?;
        return kernels::tensor(v, &[n, c / LANES, h, w, LANES]);
    }
    Ok(t.reshape((n, c / LANES, LANES, h, w))?.permute((0, 1, 3, 4, 2))?.contiguous()?)
}

/// Blocked `[n, c/8, h, w, 8]` back to `[n, c, h, w]`.
pub(crate) fn from_blocked(t: &Tensor) -> Result<Tensor> {
    let d = t.dims();
    if d.len() != 5 || d[4] != LANES {
        return Err(candle_core::Error::Msg(format!("expected a blocked [n, c/8, h, w, 8] tensor, found {d:?}")).into());
    }
    let (n, c, h, w) = (d[0], d[1] * LANES, d[2], d[3]);
    if kernels::usable(&[t]) {
        let v = kernels::with_data(t, |x| nchwc::unblock(x, n, c, h * w))?;
        return kernels::tensor(v, &[n, c, h, w]);
    }
    Ok(t.permute((0, 1, 4, 2, 3))?.reshape((n, c, h, w))?)
}

/// An inference BatchNormalization of blocked `x` (its statistics and affine parameters in `ins` 1..=4),
/// as one per-channel multiply-add.
fn batch_norm(node: &NodeProto, x: &Tensor, ins: &[Option<Tensor>]) -> Result<Tensor> {
    let param = |k: usize| -> Result<Vec<f32>> {
        let t = ins.get(k).cloned().flatten().ok_or_else(|| node_err(node, format!("input {k} is missing")))?;
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let (scale, bias, mean, var) = (param(1)?, param(2)?, param(3)?, param(4)?);
    let d = x.dims();
    let (n, c, hw) = (d[0], d[1] * LANES, d[2] * d[3]);
    if [&scale, &bias, &mean, &var].iter().any(|v| v.len() != c) {
        return Err(node_err(node, format!("expected {c} values in each of scale, B, mean and var")));
    }
    let (a, b) = ops::norm::batch_norm_affine(node, (&scale, &bias, &mean, &var));
    if kernels::usable(&[x]) {
        let y = kernels::with_data(x, |xs| nchwc::channel_affine(xs, (n, c, hw), &a, &b))?;
        return kernels::tensor(y, d);
    }
    let shape = [1, d[1], 1, 1, LANES];
    let (a, b) = (Tensor::from_vec(a, &shape, x.device())?, Tensor::from_vec(b, &shape, x.device())?);
    Ok(x.broadcast_mul(&a)?.broadcast_add(&b)?)
}

/// GlobalAveragePool of a blocked value: NCHW `[n, c, 1, 1]`.
pub(crate) fn global_avg_pool(t: &Tensor) -> Result<Tensor> {
    let d = t.dims();
    let (n, c, hw) = (d[0], d[1] * LANES, d[2] * d[3]);
    if kernels::usable(&[t]) {
        let v = kernels::with_data(t, |x| nchwc::global_avg_pool(x, n, c, hw))?;
        return kernels::tensor(v, &[n, c, 1, 1]);
    }
    ops_gap(&from_blocked(t)?)
}

fn ops_gap(t: &Tensor) -> Result<Tensor> {
    let (n, c) = (t.dims()[0], t.dims()[1]);
    Ok(t.reshape((n, c, ()))?.mean_keepdim(2)?.reshape((n, c, 1, 1))?)
}

impl Blocked {
    /// Runs blocked step `i` (`node`, fused as `fused`) on `ins`, whose blocked inputs are those named in
    /// `self.values`; returns the output's name and its blocked value.
    pub(crate) fn run(
        &self,
        graph: &super::Graph,
        i: usize,
        node: &NodeProto,
        fused: Option<&Fused>,
        ins: &[Option<Tensor>],
        statics: &HashMap<String, Tensor>,
    ) -> Result<(String, Tensor)> {
        let out = step_output(node, fused).ok_or_else(|| node_err(node, "blocked step without an output"))?;
        if let Some(Fused::Silu { .. }) = fused {
            let x = ins.first().cloned().flatten().ok_or_else(|| node_err(node, "input 0 is missing"))?;
            return Ok((out, ops::unary::silu(&x)?));
        }
        let blocked_in = |k: usize| node.input.get(k).is_some_and(|v| self.values.contains(v));
        let relaid = |k: usize| -> Result<Tensor> {
            let t = ins.get(k).cloned().flatten().ok_or_else(|| node_err(node, format!("input {k} is missing")))?;
            if blocked_in(k) {
                Ok(t)
            } else {
                to_blocked(&t)
            }
        };
        match node.op_type.as_str() {
            "BatchNormalization" => return Ok((out, batch_norm(node, &relaid(0)?, ins)?)),
            "MaxPool" | "AveragePool" => return Ok((out, ops::pool::pool_blocked(node, &relaid(0)?)?)),
            "Concat" => {
                let parts = (0..node.input.len()).map(relaid).collect::<Result<Vec<_>>>()?;
                if let Some(y) = kernels::concat(&parts.iter().collect::<Vec<_>>(), 1)? {
                    return Ok((out, y));
                }
                return Ok((out, Tensor::cat(&parts, 1)?));
            }
            "Add" | "Mul" if !(blocked_in(0) && blocked_in(1)) => {
                let both = [Some(relaid(0)?), Some(relaid(1)?)];
                let y = ops::eval(node, &both, graph.opset, &graph.device)?.into_iter().next();
                return Ok((out, y.ok_or_else(|| node_err(node, "no output"))?));
            }
            _ => {}
        }
        if node.op_type != "Conv" {
            // Elementwise on identical layouts: the ordinary op on the blocked tensors.
            let y = ops::eval(node, ins, graph.opset, &graph.device)?.into_iter().next();
            return Ok((out, y.ok_or_else(|| node_err(node, "no output"))?));
        }
        self.conv(i, node, fused, ins, statics, out)
    }

    /// Blocked conv step `i` (see [`Blocked::run`]), its result named `out`.
    fn conv(
        &self,
        i: usize,
        node: &NodeProto,
        fused: Option<&Fused>,
        ins: &[Option<Tensor>],
        statics: &HashMap<String, Tensor>,
        out: String,
    ) -> Result<(String, Tensor)> {
        let arg =
            |k: usize| ins.get(k).cloned().flatten().ok_or_else(|| node_err(node, format!("input {k} is missing")));
        let (x, w) = (arg(0)?, arg(1)?);
        let b = ins.get(2).cloned().flatten();
        let (act, epilogue) = match fused {
            Some(&Fused::ConvAct { lo, hi, epilogue, .. }) => (Some((lo, hi)), epilogue),
            _ => (None, nchwc::Epilogue::None),
        };
        let x_blocked = self.values.contains(&node.input[0]);
        let x_dims = if x_blocked {
            let d = x.dims();
            vec![d[0], d[1] * LANES, d[2], d[3]]
        } else {
            x.dims().to_vec()
        };
        let (g, group) = conv::geometry(node, &x_dims, w.dims())?;
        let (c, m) = (x_dims[1], w.dims()[0]);
        let pointwise = g.k == (1, 1) && g.s == (1, 1) && g.pads == [0; 4] && group == 1;
        let depthwise = group == c && group == m && w.dims()[1] == 1 && g.k.0 <= 16;
        let fast = kernels::usable(&[&x, &w]) && b.as_ref().is_none_or(|b| kernels::usable(&[b]));
        let bias = match &b {
            Some(b) if fast => b.flatten_all()?.to_vec1::<f32>()?,
            _ => vec![0.0; m],
        };
        let (lo, hi) = act.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
        let nact = nchwc::Act { lo, hi, epilogue };
        let (n, h, wd) = (x_dims[0], x_dims[2], x_dims[3]);
        let (oh, ow) = g.out_size(h, wd);
        let (cg, mg) = (c / group.max(1), m / group.max(1));
        if fast && !pointwise && !depthwise && cg.is_multiple_of(LANES) && mg.is_multiple_of(LANES) {
            // A dense or grouped conv on whole channel blocks per group: the blocked direct kernel.
            let xb = if x_blocked { x } else { to_blocked(&x)? };
            let pack = |ws: &[f32]| nchwc::pack_dense_blocked(ws, (m, group), cg, g.k);
            let packed = self.packed_weights(i, node, &w, statics, pack)?;
            let y = kernels::with_data(&xb, |xs| {
                nchwc::dense_blocked(xs, (n, c, h, wd), &packed, &bias, (m, group), g, nact, Isa::detect(false))
            })?;
            return Ok((out, kernels::tensor(y, &[n, m / LANES, oh, ow, LANES])?));
        }
        if fast && group == 1 && !pointwise && m.is_multiple_of(LANES) && g.k.0 <= 16 {
            // A dense conv (a stem) reads NCHW and writes blocked directly.
            let x = if x_blocked { from_blocked(&x)? } else { x };
            let packed = self.packed_weights(i, node, &w, statics, |ws| nchwc::pack_dense(ws, m, ws.len() / m))?;
            let y = kernels::with_data(&x, |xs| {
                nchwc::dense_to_blocked(xs, (n, c, h, wd), &packed, &bias, m, g, nact, false)
            })?;
            return Ok((out, kernels::tensor(y, &[n, m / LANES, oh, ow, LANES])?));
        }
        if !(fast && (pointwise || depthwise) && c.is_multiple_of(LANES) && m.is_multiple_of(LANES)) {
            let x = if x_blocked { from_blocked(&x)? } else { x };
            let y = conv::conv_act(node, &x, &w, b.as_ref(), act)?;
            return Ok((out, to_blocked(&conv::epilogue(y, epilogue)?)?));
        }
        let xb = if x_blocked { x } else { to_blocked(&x)? };
        let packed = self.packed_weights(i, node, &w, statics, |ws| {
            if pointwise {
                nchwc::pack_pointwise(ws, m, c)
            } else {
                nchwc::pack_depthwise(ws, c, g.k.0 * g.k.1)
            }
        })?;
        let y = kernels::with_data(&xb, |xs| {
            if pointwise {
                nchwc::pointwise(xs, (n, c, h * wd), &packed, &bias, m, nact, false)
            } else {
                nchwc::depthwise(xs, (n, c, h, wd), &packed, &bias, g, nact, false)
            }
        })?;
        Ok((out, kernels::tensor(y, &[n, m / LANES, oh, ow, LANES])?))
    }

    /// The packed form of conv `i`'s weight `w`, cached when the weight is a plan constant.
    fn packed_weights(
        &self,
        i: usize,
        node: &NodeProto,
        w: &Tensor,
        statics: &HashMap<String, Tensor>,
        pack: impl FnOnce(&[f32]) -> Vec<f32>,
    ) -> Result<Arc<Vec<f32>>> {
        let constant = statics.contains_key(&node.input[1]);
        if constant {
            if let Some(p) = self.packed.lock().ok().and_then(|m| m.get(&i).cloned()) {
                return Ok(p);
            }
        }
        let p = Arc::new(kernels::with_data(w, pack)?);
        if constant {
            if let Ok(mut m) = self.packed.lock() {
                m.insert(i, p.clone());
            }
        }
        Ok(p)
    }
}
