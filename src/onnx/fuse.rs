//! Fusions the plan applies to its runtime steps, each replacing several memory passes by one:
//! a Conv followed by Relu/Clip (clamped as it is written), a MatMul followed by the Add of a constant bias
//! row (added inside the gemm), and the erf GELU that exporters spell Div(x, sqrt 2) -> Erf -> Add 1 ->
//! Mul x -> Mul 0.5 (one kernel instead of five).

use std::collections::{HashMap, HashSet};

use candle_core::Tensor;
use candle_onnx::onnx::NodeProto;

use super::ops::Attrs;

/// A step that runs a fused pattern instead of its own node.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fused {
    /// The Conv node, then clamp to [lo, hi]; the result is `out`.
    ConvAct { lo: f32, hi: f32, out: String },
    /// The MatMul node plus the static row `bias`, then GELU when `gelu`; the result is `out`.
    MatMulBias { bias: String, out: String, gelu: bool },
    /// GELU of `input` (the step's Div node and the four after it); the result is `out`.
    Gelu { input: String, out: String },
}

/// The scalar value of a static tensor, if it is one.
fn scalar(statics: &HashMap<String, Tensor>, name: &str) -> Option<f32> {
    let t = statics.get(name)?;
    if t.elem_count() != 1 {
        return None;
    }
    t.flatten_all().ok()?.to_dtype(candle_core::DType::F32).ok()?.to_vec1::<f32>().ok()?.first().copied()
}

/// Finds fusable patterns among `steps`. Returns the steps left to run and the fused ones by node index.
pub(crate) fn fuse(
    nodes: &[NodeProto],
    steps: &[usize],
    statics: &HashMap<String, Tensor>,
    outputs: &[String],
    opset: i64,
) -> (Vec<usize>, HashMap<usize, Fused>) {
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for &i in steps {
        for v in &nodes[i].input {
            consumers.entry(v.as_str()).or_default().push(i);
        }
    }
    // The only node reading `v`, when nothing else (an output included) needs it.
    let single = |v: &str| -> Option<usize> {
        match consumers.get(v).map(Vec::as_slice) {
            Some([j]) if !outputs.iter().any(|o| o == v) => Some(*j),
            _ => None,
        }
    };
    let other_input = |n: &NodeProto, v: &str| -> Option<String> {
        match n.input.as_slice() {
            [a, b] if a == v => Some(b.clone()),
            [a, b] if b == v => Some(a.clone()),
            _ => None,
        }
    };
    let mut removed: HashSet<usize> = HashSet::new();
    let mut fused = HashMap::new();
    let mut gelu_chains: HashMap<usize, [usize; 4]> = HashMap::new();
    for &i in steps {
        if removed.contains(&i) {
            continue;
        }
        let n = &nodes[i];
        let Some(out) = n.output.first() else { continue };
        match n.op_type.as_str() {
            "Conv" => {
                let Some(j) = single(out) else { continue };
                let c = &nodes[j];
                let bounds = match c.op_type.as_str() {
                    "Relu" => Some((0.0, f32::INFINITY)),
                    "Clip" if opset >= 11 => {
                        let lo = c.input.get(1).filter(|s| !s.is_empty()).map(|s| scalar(statics, s));
                        let hi = c.input.get(2).filter(|s| !s.is_empty()).map(|s| scalar(statics, s));
                        match (lo, hi) {
                            (Some(None), _) | (_, Some(None)) => None,
                            (lo, hi) => {
                                Some((lo.flatten().unwrap_or(f32::NEG_INFINITY), hi.flatten().unwrap_or(f32::INFINITY)))
                            }
                        }
                    }
                    "Clip" => {
                        let at = Attrs(c);
                        Some((at.float("min", f32::NEG_INFINITY), at.float("max", f32::INFINITY)))
                    }
                    _ => None,
                };
                if let (Some((lo, hi)), Some(o)) = (bounds, c.output.first()) {
                    removed.insert(j);
                    fused.insert(i, Fused::ConvAct { lo, hi, out: o.clone() });
                }
            }
            "MatMul" => {
                let Some(j) = single(out) else { continue };
                let a = &nodes[j];
                let Some(bias) = (a.op_type == "Add").then(|| other_input(a, out)).flatten() else { continue };
                let cols = statics.get(&n.input[1]).and_then(|w| w.dims().last().copied());
                let is_row = statics
                    .get(&bias)
                    .is_some_and(|b| b.dims().iter().rev().skip(1).all(|&d| d == 1) && Some(b.elem_count()) == cols);
                if is_row {
                    removed.insert(j);
                    fused.insert(i, Fused::MatMulBias { bias, out: a.output[0].clone(), gelu: false });
                }
            }
            "Div" => {
                let x = &n.input[0];
                let near = |v: Option<f32>, want: f32| v.is_some_and(|v| (v - want).abs() < 1e-4);
                if !near(n.input.get(1).and_then(|s| scalar(statics, s)), std::f32::consts::SQRT_2) {
                    continue;
                }
                let chain = (|| {
                    let e = single(out).filter(|&e| nodes[e].op_type == "Erf")?;
                    let a = single(&nodes[e].output[0]).filter(|&a| nodes[a].op_type == "Add")?;
                    let one = other_input(&nodes[a], &nodes[e].output[0])?;
                    if !near(scalar(statics, &one), 1.0) {
                        return None;
                    }
                    let m = single(&nodes[a].output[0]).filter(|&m| nodes[m].op_type == "Mul")?;
                    if other_input(&nodes[m], &nodes[a].output[0]).as_ref() != Some(x) {
                        return None;
                    }
                    let h = single(&nodes[m].output[0]).filter(|&h| nodes[h].op_type == "Mul")?;
                    let half = other_input(&nodes[h], &nodes[m].output[0])?;
                    near(scalar(statics, &half), 0.5).then_some([e, a, m, h])
                })();
                if let Some(chain) = chain {
                    removed.extend(chain);
                    gelu_chains.insert(i, chain);
                    fused.insert(i, Fused::Gelu { input: x.clone(), out: nodes[chain[3]].output[0].clone() });
                }
            }
            _ => {}
        }
    }
    // A GELU whose input is a MatMul+bias read by nothing else runs inside that product (on each block of
    // rows as it is finished, while still in cache).
    let mut absorbed = Vec::new();
    for (&i, f) in fused.iter_mut() {
        let Fused::MatMulBias { out, gelu, .. } = f else { continue };
        let readers = consumers.get(out.as_str()).map(Vec::as_slice).unwrap_or_default();
        let Some(&j) = readers.first() else { continue };
        let Some(chain) = gelu_chains.get(&j) else { continue };
        if outputs.contains(out) || !readers.iter().all(|r| *r == j || chain.contains(r)) {
            continue;
        }
        *out = nodes[chain[3]].output[0].clone();
        *gelu = true;
        absorbed.push((i, j));
    }
    for (_, j) in absorbed {
        fused.remove(&j);
        removed.insert(j);
    }
    (steps.iter().copied().filter(|i| !removed.contains(i)).collect(), fused)
}
