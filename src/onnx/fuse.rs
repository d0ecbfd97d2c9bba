//! Fusions the plan applies to its runtime steps, each replacing several memory passes by one:
//! a Conv followed by Relu/Clip (clamped as it is written) or by SiLU/GELU/HardSwish (its epilogue), a
//! MatMul followed by the Add of a constant bias row (added inside the gemm), the erf GELU that exporters
//! spell Div(x, sqrt 2) -> Erf -> Add 1 -> Mul x -> Mul 0.5 or Mul 0.5 -> Mul x (one kernel instead of
//! five), and SiLU spelled Mul(x, Sigmoid(x)). And, as rewrites of the plan's nodes: a zero Pad folded into
//! the Conv that reads it, a BatchNormalization folded into the product by a static matrix before it, and
//! steps that return their input unchanged (Identity, a Slice or Reshape to the same shape: GhostNet's
//! `out[:, :oup]` after a Concat) dropped, their readers rewired.

use std::collections::{HashMap, HashSet};

use candle_core::Tensor;
use candle_onnx::onnx::NodeProto;

use super::kernels::nchwc::Epilogue;
use super::ops::{self, Attrs};

/// A step that runs a fused pattern instead of its own node.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fused {
    /// The Conv node, then clamp to [lo, hi], then `epilogue`; the result is `out`.
    ConvAct { lo: f32, hi: f32, epilogue: Epilogue, out: String },
    /// The MatMul node plus the static row `bias`, then GELU when `gelu`; the result is `out`.
    MatMulBias { bias: String, out: String, gelu: bool },
    /// GELU of `input` (the step's Div node and the four after it); the result is `out`.
    Gelu { input: String, out: String },
    /// SiLU of the step's Sigmoid input x: the Sigmoid and the Mul(x, Sigmoid(x)) reading it; the result
    /// is `out`.
    Silu { out: String },
}

/// The scalar value of a static tensor, if it is one.
fn scalar(statics: &HashMap<String, Tensor>, name: &str) -> Option<f32> {
    let t = statics.get(name)?;
    if t.elem_count() != 1 {
        return None;
    }
    t.flatten_all().ok()?.to_dtype(candle_core::DType::F32).ok()?.to_vec1::<f32>().ok()?.first().copied()
}

/// The runtime steps' nodes with who reads what, for the pattern matchers.
struct View<'a> {
    nodes: &'a [NodeProto],
    statics: &'a HashMap<String, Tensor>,
    outputs: &'a [String],
    consumers: HashMap<&'a str, Vec<usize>>,
}

impl<'a> View<'a> {
    /// The view of `steps` (node indices into `nodes`).
    fn new(
        nodes: &'a [NodeProto],
        steps: &[usize],
        statics: &'a HashMap<String, Tensor>,
        outputs: &'a [String],
    ) -> View<'a> {
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for &i in steps {
            for v in &nodes[i].input {
                consumers.entry(v.as_str()).or_default().push(i);
            }
        }
        View { nodes, statics, outputs, consumers }
    }

    /// The only node reading `v`, when nothing else (an output included) needs it.
    fn single(&self, v: &str) -> Option<usize> {
        match self.consumers.get(v).map(Vec::as_slice) {
            Some([j]) if !self.outputs.iter().any(|o| o == v) => Some(*j),
            _ => None,
        }
    }

    fn scalar(&self, name: &str) -> Option<f32> {
        scalar(self.statics, name)
    }
}

/// The input of a two-input node that is not `v`.
fn other_input(n: &NodeProto, v: &str) -> Option<String> {
    match n.input.as_slice() {
        [a, b] if a == v => Some(b.clone()),
        [a, b] if b == v => Some(a.clone()),
        _ => None,
    }
}

/// Conv (output `out`) followed by its only reader Relu/Clip/HardSwish, or by SiLU spelled
/// Mul(out, Sigmoid(out)): the fused readers' indices and the fusion.
fn conv_act(g: &View<'_>, out: &str, opset: i64) -> Option<(Vec<usize>, Fused)> {
    if let Some(f) = conv_silu(g, out) {
        return Some(f);
    }
    let j = g.single(out)?;
    let c = &g.nodes[j];
    let (lo, hi) = match c.op_type.as_str() {
        "HardSwish" => return Some((vec![j], conv_epilogue(Epilogue::HardSwish, c.output.first()?))),
        "Relu" => (0.0, f32::INFINITY),
        "Clip" if opset >= 11 => {
            let bound = |k: usize| c.input.get(k).filter(|s| !s.is_empty()).map(|s| g.scalar(s));
            match (bound(1), bound(2)) {
                // A bound that is not a static scalar: not fusable.
                (Some(None), _) | (_, Some(None)) => return None,
                (lo, hi) => (lo.flatten().unwrap_or(f32::NEG_INFINITY), hi.flatten().unwrap_or(f32::INFINITY)),
            }
        }
        "Clip" => {
            let at = Attrs(c);
            (at.float("min", f32::NEG_INFINITY), at.float("max", f32::INFINITY))
        }
        _ => return None,
    };
    Some((vec![j], Fused::ConvAct { lo, hi, epilogue: Epilogue::None, out: c.output.first()?.clone() }))
}

/// Conv output `out` read by exactly a Sigmoid of it and the Mul of it by that Sigmoid (the Sigmoid's
/// only reader): both folded into the conv as a SiLU epilogue.
fn conv_silu(g: &View<'_>, out: &str) -> Option<(Vec<usize>, Fused)> {
    if g.outputs.iter().any(|o| o == out) {
        return None;
    }
    let &[a, b] = g.consumers.get(out)?.as_slice() else { return None };
    let s = if g.nodes[a].op_type == "Sigmoid" { a } else { b };
    let sn = &g.nodes[s];
    if sn.op_type != "Sigmoid" {
        return None;
    }
    // The Sigmoid's only reader multiplies it by `out` (the Sigmoid's input), and is the conv's other reader.
    let (m, Fused::Silu { out: y }) = silu(g, sn, sn.output.first()?)? else { return None };
    [a, b].contains(&m).then(|| (vec![s, m], conv_epilogue(Epilogue::Silu, &y)))
}

/// A conv with `e` after it; the result is `out`.
fn conv_epilogue(e: Epilogue, out: &str) -> Fused {
    Fused::ConvAct { lo: f32::NEG_INFINITY, hi: f32::INFINITY, epilogue: e, out: out.to_string() }
}

/// Sigmoid `n` (output `out`) whose only reader multiplies it by the Sigmoid's own input: SiLU.
fn silu(g: &View<'_>, n: &NodeProto, out: &str) -> Option<(usize, Fused)> {
    let j = g.single(out)?;
    let m = &g.nodes[j];
    let x = n.input.first()?;
    (m.op_type == "Mul" && other_input(m, out).as_ref() == Some(x))
        .then(|| (j, Fused::Silu { out: m.output[0].clone() }))
}

/// MatMul `n` by a static matrix (output `out`) followed by its only reader adding a static bias row.
fn matmul_bias(g: &View<'_>, n: &NodeProto, out: &str) -> Option<(usize, Fused)> {
    let j = g.single(out)?;
    let a = &g.nodes[j];
    let bias = (a.op_type == "Add").then(|| other_input(a, out)).flatten()?;
    let cols = g.statics.get(&n.input[1]).and_then(|w| w.dims().last().copied());
    let is_row = g
        .statics
        .get(&bias)
        .is_some_and(|b| b.dims().iter().rev().skip(1).all(|&d| d == 1) && Some(b.elem_count()) == cols);
    is_row.then(|| (j, Fused::MatMulBias { bias, out: a.output[0].clone(), gelu: false }))
}

/// The erf GELU starting at Div `n` (output `out`): Div(x, sqrt 2) -> Erf -> Add 1 -> Mul x -> Mul 0.5.
/// Returns the four nodes after the Div and the fusion.
fn gelu(g: &View<'_>, n: &NodeProto, out: &str) -> Option<([usize; 4], Fused)> {
    let x = &n.input[0];
    let near = |v: Option<f32>, want: f32| v.is_some_and(|v| (v - want).abs() < 1e-4);
    if !near(n.input.get(1).and_then(|s| g.scalar(s)), std::f32::consts::SQRT_2) {
        return None;
    }
    let next = |v: &str, op: &str| g.single(v).filter(|&k| g.nodes[k].op_type == op);
    let e = next(out, "Erf")?;
    let a = next(&g.nodes[e].output[0], "Add")?;
    if !near(g.scalar(&other_input(&g.nodes[a], &g.nodes[e].output[0])?), 1.0) {
        return None;
    }
    // Then times x and times 0.5, in either order (TorchScript: x first; dynamo: 0.5 first).
    let m = next(&g.nodes[a].output[0], "Mul")?;
    let first = other_input(&g.nodes[m], &g.nodes[a].output[0])?;
    let h = next(&g.nodes[m].output[0], "Mul")?;
    let second = other_input(&g.nodes[h], &g.nodes[m].output[0])?;
    let half = |v: &str| near(g.scalar(v), 0.5);
    let fused = Fused::Gelu { input: x.clone(), out: g.nodes[h].output[0].clone() };
    ((&first == x && half(&second)) || (half(&first) && &second == x)).then_some(([e, a, m, h], fused))
}

/// Finds fusable patterns among `steps`. Returns the steps left to run and the fused ones by node index.
/// A `training` plan (gradients tracked) fuses only GELU, the one pattern with a backward pass of its own
/// ([`super::kernels::grad::GeluOp`]).
pub(crate) fn fuse(
    nodes: &[NodeProto],
    steps: &[usize],
    statics: &HashMap<String, Tensor>,
    outputs: &[String],
    opset: i64,
    training: bool,
) -> (Vec<usize>, HashMap<usize, Fused>) {
    let g = View::new(nodes, steps, statics, outputs);
    let mut removed: HashSet<usize> = HashSet::new();
    let mut fused = HashMap::new();
    let mut gelu_chains: HashMap<usize, [usize; 4]> = HashMap::new();
    for &i in steps {
        let n = &nodes[i];
        let Some(out) = n.output.first().filter(|_| !removed.contains(&i)) else { continue };
        let found = match n.op_type.as_str() {
            "Conv" | "MatMul" | "Sigmoid" if training => None,
            "Conv" => conv_act(&g, out, opset),
            "MatMul" => matmul_bias(&g, n, out).map(|(j, f)| (vec![j], f)),
            "Sigmoid" => silu(&g, n, out).map(|(j, f)| (vec![j], f)),
            "Div" => gelu(&g, n, out).map(|(chain, f)| {
                gelu_chains.insert(i, chain);
                (chain.to_vec(), f)
            }),
            _ => None,
        };
        if let Some((gone, f)) = found {
            removed.extend(gone);
            fused.insert(i, f);
        }
    }
    if !training {
        absorb_gelu(&g, steps, &mut fused, &mut removed, &gelu_chains);
    }
    (steps.iter().copied().filter(|i| !removed.contains(i)).collect(), fused)
}

/// A GELU whose input is a MatMul+bias read by nothing else runs inside that product (on each block of
/// rows as it is finished, while still in cache).
fn absorb_gelu(
    g: &View<'_>,
    steps: &[usize],
    fused: &mut HashMap<usize, Fused>,
    removed: &mut HashSet<usize>,
    gelu_chains: &HashMap<usize, [usize; 4]>,
) {
    // The GELU chain that alone reads `out` (its first step's index and its last node).
    let chain_after = |out: &str| {
        let readers = g.consumers.get(out).map(Vec::as_slice).unwrap_or_default();
        let &j = readers.first()?;
        let chain = gelu_chains.get(&j)?;
        let only = !g.outputs.iter().any(|o| o == out) && readers.iter().all(|r| *r == j || chain.contains(r));
        only.then_some((j, chain[3]))
    };
    let mut absorbed = Vec::new();
    for f in fused.values_mut() {
        let Fused::MatMulBias { out, gelu, .. } = f else { continue };
        let Some((j, last)) = chain_after(out) else { continue };
        *out = g.nodes[last].output[0].clone();
        *gelu = true;
        absorbed.push(j);
    }
    // A conv whose output only a GELU reads (EfficientFormer's 1x1 MLP): GELU as the conv's epilogue.
    for &i in steps {
        let n = &g.nodes[i];
        if n.op_type != "Conv" || fused.contains_key(&i) || removed.contains(&i) {
            continue;
        }
        let Some((j, last)) = n.output.first().and_then(|o| chain_after(o)) else { continue };
        fused.insert(i, conv_epilogue(Epilogue::Gelu, &g.nodes[last].output[0]));
        absorbed.push(j);
    }
    for j in absorbed {
        fused.remove(&j);
        removed.insert(j);
    }
}

/// The spatial padding `[top, left, bottom, right]` of Pad node `n` when it is a zero constant pad of
/// only the H and W axes of a 4-D value (TF-style "same" padding, which exporters spell as an explicit
/// Pad before the Conv), with every operand static.
fn zero_spatial_pad(n: &NodeProto, statics: &HashMap<String, Tensor>, opset: i64) -> Option<[i64; 4]> {
    let at = Attrs(n);
    if at.string("mode").is_some_and(|m| m != "constant") {
        return None;
    }
    let pads = if opset >= 11 {
        let given = |k: usize| n.input.get(k).is_some_and(|v| !v.is_empty());
        // A fill value other than zero, or an explicit axes list: left as it is.
        if given(3) || (given(2) && scalar(statics, &n.input[2]) != Some(0.0)) {
            return None;
        }
        ops::to_i64s(statics.get(n.input.get(1)?)?).ok()?
    } else {
        if at.float("value", 0.0) != 0.0 {
            return None;
        }
        at.ints("pads")?
    };
    match pads[..] {
        [0, 0, t, l, 0, 0, b, r] if [t, l, b, r].iter().all(|&p| p >= 0) => Some([t, l, b, r]),
        _ => None,
    }
}

/// Folds each zero spatial Pad whose only reader is a Conv (as its data input, with explicit or no
/// `pads` and no `auto_pad`) into that Conv's `pads`: the padded copy is never made and the conv keeps
/// its blocked kernel. Returns the plan's nodes (those Convs rewritten) and the steps left.
pub(crate) fn fold_pads(
    nodes: &[NodeProto],
    steps: &[usize],
    statics: &HashMap<String, Tensor>,
    outputs: &[String],
    opset: i64,
) -> (Vec<NodeProto>, Vec<usize>) {
    let g = View::new(nodes, steps, statics, outputs);
    let mut out = nodes.to_vec();
    let mut removed = HashSet::new();
    for &i in steps {
        let n = &nodes[i];
        if n.op_type != "Pad" {
            continue;
        }
        let (Some(extra), Some(v)) = (zero_spatial_pad(n, statics, opset), n.output.first()) else { continue };
        let Some(j) = g.single(v) else { continue };
        let c = &nodes[j];
        let at = Attrs(c);
        let notset = at.string("auto_pad").is_none_or(|a| a == "NOTSET");
        let own = at.ints("pads").unwrap_or_else(|| vec![0; 4]);
        if c.op_type != "Conv" || c.input.first() != Some(v) || !notset || own.len() != 4 {
            continue;
        }
        let conv = &mut out[j];
        conv.input[0] = n.input[0].clone();
        conv.attribute.retain(|a| a.name != "pads");
        conv.attribute.push(candle_onnx::onnx::AttributeProto {
            name: "pads".into(),
            r#type: candle_onnx::onnx::attribute_proto::AttributeType::Ints as i32,
            ints: own.iter().zip(extra).map(|(a, b)| a + b).collect(),
            ..Default::default()
        });
        removed.insert(i);
    }
    (out, steps.iter().copied().filter(|i| !removed.contains(i)).collect())
}

/// Drops the steps whose output is their data input unchanged, rewiring every reader to that input:
/// Identity, an inference Dropout whose mask output nothing reads, and Slice/Reshape/Flatten/Squeeze/
/// Unsqueeze whose output has the input's dims (a Slice only with unit steps, so nothing is reversed). Such
/// a step costs a copy or a mask in a run and, between blocked steps, a re-layout too; gradients pass
/// through it unchanged, so training plans drop them as well. `shapes` holds every value's dims; graph
/// outputs stay.
pub(crate) fn drop_identities(
    nodes: &mut [NodeProto],
    steps: &[usize],
    statics: &HashMap<String, Tensor>,
    shapes: &HashMap<String, Vec<usize>>,
    outputs: &[String],
) -> Vec<usize> {
    let read: HashSet<String> = steps.iter().flat_map(|&i| nodes[i].input.iter().cloned()).collect();
    let mut alias: HashMap<String, String> = HashMap::new();
    let mut kept = Vec::with_capacity(steps.len());
    for &i in steps {
        for v in nodes[i].input.iter_mut() {
            if let Some(a) = alias.get(v.as_str()) {
                *v = a.clone();
            }
        }
        match identity_input(&nodes[i], statics, shapes, outputs, &read) {
            Some(x) => {
                alias.insert(nodes[i].output[0].clone(), x);
            }
            None => kept.push(i),
        }
    }
    kept
}

/// The data input of `n` when `n` returns it unchanged (see [`drop_identities`]); `read` holds every value
/// a step reads.
fn identity_input(
    n: &NodeProto,
    statics: &HashMap<String, Tensor>,
    shapes: &HashMap<String, Vec<usize>>,
    outputs: &[String],
    read: &HashSet<String>,
) -> Option<String> {
    let (x, y) = (n.input.first()?, n.output.first()?);
    let used = |o: &String| !o.is_empty() && (read.contains(o) || outputs.contains(o));
    if outputs.contains(y) || n.output.iter().skip(1).any(used) {
        return None;
    }
    let same = shapes.get(x).is_some_and(|d| shapes.get(y) == Some(d));
    let unit_steps = || match n.input.get(4).filter(|s| !s.is_empty()) {
        None => true,
        Some(s) => statics
            .get(s)
            .and_then(|t| t.to_dtype(candle_core::DType::I64).ok()?.flatten_all().ok()?.to_vec1::<i64>().ok())
            .is_some_and(|v| v.iter().all(|&s| s == 1)),
    };
    let drop = match n.op_type.as_str() {
        "Identity" | "Dropout" => true,
        "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => same,
        "Slice" => same && unit_steps(),
        _ => false,
    };
    drop.then(|| x.clone())
}

/// Folds each inference BatchNormalization over the columns of a product by a static matrix (LeViT's
/// Linear -> BatchNorm1d, exported as MatMul -> Flatten/Reshape -> BatchNormalization on `[rows, n]`) into
/// that product: the matrix's columns scaled by `scale / sqrt(var + eps)` (a new static per product) and
/// the BatchNormalization turned into the Add of the folded shift, moved before the Flatten/Reshape so that
/// it fuses into the product as its bias row. `shapes` holds every value's dims.
pub(crate) fn fold_batch_norms(
    nodes: &mut [NodeProto],
    steps: &[usize],
    statics: &mut HashMap<String, Tensor>,
    shapes: &HashMap<String, Vec<usize>>,
    outputs: &[String],
) -> crate::error::Result<()> {
    let folds = batch_norms_after_products(&View::new(nodes, steps, statics, outputs), steps, shapes);
    for (i, flat, j) in folds {
        let param = |k: usize| -> crate::error::Result<Vec<f32>> {
            Ok(statics[&nodes[j].input[k]].to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let (scale, bias, mean, var) = (param(1)?, param(2)?, param(3)?, param(4)?);
        let w = statics[&nodes[i].input[1]].to_dtype(candle_core::DType::F32)?;
        let (k, cols) = (w.dims()[0], w.dims()[1]);
        if [&scale, &bias, &mean, &var].iter().any(|v| v.len() != cols) {
            continue;
        }
        let (a, b) = ops::norm::batch_norm_affine(&nodes[j], (&scale, &bias, &mean, &var));
        let scaled: Vec<f32> =
            w.flatten_all()?.to_vec1::<f32>()?.iter().enumerate().map(|(e, v)| v * a[e % cols]).collect();
        let (wname, bname) =
            (format!("{}::bn_folded", nodes[i].output[0]), format!("{}::bn_shift", nodes[j].output[0]));
        statics.insert(wname.clone(), Tensor::from_vec(scaled, (k, cols), w.device())?);
        statics.insert(bname.clone(), Tensor::from_vec(b, cols, w.device())?);
        nodes[i].input[1] = wname;
        let bn = &mut nodes[j];
        bn.op_type = "Add".into();
        bn.input = vec![bn.input[0].clone(), bname];
        bn.attribute.clear();
        bn.output.truncate(1);
        if let Some(f) = flat {
            // MatMul -> Flatten -> Add(shift) becomes MatMul -> Add(shift) -> Flatten (the shift is per
            // column, the last dim on both sides), so the Add fuses into the product as its bias row. The
            // two nodes trade places: the Add must run first.
            let shifted = format!("{}::shifted", nodes[i].output[0]);
            let (mut add, mut reshape) = (nodes[j].clone(), nodes[f].clone());
            add.input[0] = nodes[i].output[0].clone();
            reshape.output[0] = std::mem::replace(&mut add.output[0], shifted.clone());
            reshape.input[0] = shifted;
            (nodes[f], nodes[j]) = (add, reshape);
        }
    }
    Ok(())
}

/// The (MatMul, Flatten/Reshape between if any, BatchNormalization) triples [`fold_batch_norms`] folds: a
/// product by a static matrix whose only reader, directly or through one Flatten/Reshape, is an inference
/// BatchNormalization of `[rows, cols]` with static parameters.
fn batch_norms_after_products(
    g: &View<'_>,
    steps: &[usize],
    shapes: &HashMap<String, Vec<usize>>,
) -> Vec<(usize, Option<usize>, usize)> {
    let mut folds = Vec::new();
    for &i in steps {
        let n = &g.nodes[i];
        let Some(w) = n.input.get(1).and_then(|w| g.statics.get(w)) else { continue };
        if n.op_type != "MatMul" || w.rank() != 2 {
            continue;
        }
        let cols = w.dims()[1];
        let Some(mut j) = g.single(&n.output[0]) else { continue };
        let mut between = None;
        if matches!(g.nodes[j].op_type.as_str(), "Flatten" | "Reshape") {
            let Some(k) = g.single(&g.nodes[j].output[0]) else { continue };
            between = Some(j);
            j = k;
        }
        let bn = &g.nodes[j];
        // `[rows, cols]`: the product's columns stay the last dim through any reshape between.
        let flat = shapes.get(&bn.input[0]).is_some_and(|d| d.len() == 2 && d[1] == cols);
        let params_static = bn.input.len() == 5 && bn.input.iter().skip(1).all(|v| g.statics.contains_key(v));
        if bn.op_type == "BatchNormalization" && flat && params_static && bn.output.iter().skip(1).all(String::is_empty)
        {
            folds.push((i, between, j));
        }
    }
    folds
}
