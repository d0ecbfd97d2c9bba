//! Compiled plans: per input shape, the first run evaluates every node and keeps what does not depend on
//! the input's values; later runs execute only the remaining steps (with fusions and the channel-blocked
//! layout), free each intermediate after its last reader, and can be profiled per op kind.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use candle_onnx::onnx::NodeProto;

use super::*;
use crate::error::{Error, Result};

/// Time spent in one op type during a profiled run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpTime {
    /// ONNX op type.
    pub op: String,
    /// Nodes of that type run.
    pub count: usize,
    /// Seconds spent in them.
    pub seconds: f64,
}

/// What planning made of a graph for one input shape.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanStats {
    /// Nodes in the graph.
    pub nodes: usize,
    /// Steps run per call (fused patterns count once); the rest was folded into constants or fused.
    pub steps: usize,
    /// Steps running a fused pattern.
    pub fused: usize,
    /// Steps whose output stays channel-blocked (NCHWc).
    pub blocked: usize,
    /// MatMul+bias steps that also apply a GELU (the exporter's five-node erf GELU absorbed).
    pub matmul_gelu: usize,
}

/// Values computed once for an input shape, and the nodes left to run.
pub(super) struct Plan {
    /// The graph's nodes as this plan runs them (a Conv may have absorbed the Pad before it).
    pub(super) nodes: Vec<NodeProto>,
    pub(super) statics: HashMap<String, Tensor>,
    pub(super) steps: Vec<usize>,
    /// Steps that run a fused pattern (by node index).
    pub(super) fused: HashMap<usize, fuse::Fused>,
    /// For each step, the values whose last use it is.
    pub(super) frees: Vec<Vec<String>>,
    /// Whether trainable initializers are read as tracked `Var`s (else detached).
    pub(super) track: bool,
    /// Steps and values kept channel-blocked (CPU inference plans only).
    pub(super) blocked: layout::Blocked,
    /// Packed constant matrices of MatMul steps, by node index (filled on first use).
    pub(super) packed_matrices: Mutex<HashMap<usize, Arc<kernels::sgemm::PackedB>>>,
}

/// Input shapes, and whether trainable initializers are tracked.
pub(super) type PlanKey = (Vec<Vec<usize>>, bool);

impl Graph {
    /// Runs every node once, recording which values are input-independent.
    pub(super) fn build_plan(&self, feeds: &[(&str, Tensor)], track: bool) -> Result<(Vec<Tensor>, Plan)> {
        let mut values: HashMap<String, Tensor> =
            self.initializers.keys().filter_map(|k| self.init_value(k, track).map(|t| (k.clone(), t))).collect();
        let mut is_static: HashSet<String> =
            self.initializers.keys().filter(|k| !self.trainable.contains(*k)).cloned().collect();
        // Every value's shape for this input, for the layout decisions that depend on it.
        let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
        for (n, t) in feeds {
            values.insert(n.to_string(), t.clone());
            shapes.insert(n.to_string(), t.dims().to_vec());
        }
        let mut steps = Vec::new();
        // Input-dependent values are freed after their last reader, as in planned runs (statics are kept:
        // the plan may need them).
        let mut last: HashMap<&str, usize> = HashMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            for n in &node.input {
                last.insert(n.as_str(), i);
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let ins = self.node_inputs(node, |n| values.get(n).cloned())?;
            let outs = ops::eval(node, &ins, self.opset, &self.device)?;
            drop(ins);
            let stat = matches!(node.op_type.as_str(), "Shape" | "Size")
                || node.input.iter().filter(|n| !n.is_empty()).all(|n| is_static.contains(n));
            if !stat {
                steps.push(i);
            }
            for (name, t) in node.output.iter().zip(outs) {
                if !name.is_empty() {
                    shapes.insert(name.clone(), t.dims().to_vec());
                    if stat {
                        is_static.insert(name.clone());
                    }
                    values.insert(name.clone(), t);
                }
            }
            for n in &node.input {
                if last.get(n.as_str()) == Some(&i) && !is_static.contains(n) && !self.outputs.contains(n) {
                    values.remove(n);
                }
            }
        }
        let outs = self.collect_outputs(&values)?;
        // Keep only statics that a runtime step or an output reads.
        let mut needed: HashSet<&str> = self.outputs.iter().map(String::as_str).collect();
        for &i in &steps {
            needed.extend(self.nodes[i].input.iter().map(String::as_str));
        }
        let mut statics: HashMap<String, Tensor> = values
            .into_iter()
            .filter(|(k, _)| is_static.contains(k) && needed.contains(k.as_str()))
            .map(|(k, t)| t.contiguous().map(|t| (k, t)))
            .collect::<candle_core::Result<_>>()?;
        // Fused kernels are inference-only, but for GELU (which has a backward pass); nothing fuses off the CPU.
        let tracked = feeds.iter().any(|(_, t)| t.track_op()) || (track && !self.trainable.is_empty());
        let own_cpu = self.device.is_cpu() && !crate::util::device::candle_ops_only();
        let (nodes, steps, fused, blocked) = if own_cpu && !tracked {
            let (mut nodes, steps) = fuse::fold_pads(&self.nodes, &steps, &statics, &self.outputs, self.opset);
            let steps = fuse::drop_identities(&mut nodes, &steps, &statics, &shapes, &self.outputs);
            fuse::fold_batch_norms(&mut nodes, &steps, &mut statics, &shapes, &self.outputs)?;
            let (steps, fused) = fuse::fuse(&nodes, &steps, &statics, &self.outputs, self.opset, false);
            let blocked = layout::plan(&nodes, &steps, &fused, &statics, &shapes, &self.outputs);
            (nodes, steps, fused, blocked)
        } else if own_cpu {
            let mut nodes = self.nodes.clone();
            let steps = fuse::drop_identities(&mut nodes, &steps, &statics, &shapes, &self.outputs);
            let (steps, fused) = fuse::fuse(&nodes, &steps, &statics, &self.outputs, self.opset, true);
            (nodes, steps, fused, layout::Blocked::default())
        } else {
            (self.nodes.clone(), steps, HashMap::new(), layout::Blocked::default())
        };
        let frees = self.last_uses(&nodes, &steps, &statics);
        let packed_matrices = Mutex::default();
        Ok((outs, Plan { nodes, statics, steps, fused, frees, track, blocked, packed_matrices }))
    }

    fn last_uses(&self, nodes: &[NodeProto], steps: &[usize], statics: &HashMap<String, Tensor>) -> Vec<Vec<String>> {
        let mut last: HashMap<&str, usize> = HashMap::new();
        for (s, &i) in steps.iter().enumerate() {
            for n in &nodes[i].input {
                if !n.is_empty() && !statics.contains_key(n) {
                    last.insert(n.as_str(), s);
                }
            }
        }
        let mut frees = vec![Vec::new(); steps.len()];
        for (name, s) in last {
            if !self.outputs.iter().any(|o| o == name) {
                frees[s].push(name.to_string());
            }
        }
        frees
    }

    /// Plans for `feeds` (running the graph once if no plan exists yet) and says what the plan does.
    pub fn plan_stats(&self, feeds: &[(&str, Tensor)]) -> Result<PlanStats> {
        let plan = self.plan_for(feeds)?;
        Ok(PlanStats {
            nodes: self.nodes.len(),
            steps: plan.steps.len(),
            fused: plan.fused.len(),
            blocked: plan.blocked.steps.len(),
            matmul_gelu: plan
                .fused
                .values()
                .filter(|f| matches!(f, fuse::Fused::MatMulBias { gelu: true, .. }))
                .count(),
        })
    }

    /// The inference plan for `feeds`, built by a first run when missing.
    fn plan_for(&self, feeds: &[(&str, Tensor)]) -> Result<Arc<Plan>> {
        self.plan_mode(feeds, false)
    }

    /// The plan for `feeds` with gradients tracked (`track`, as [`Graph::run`] with trainable
    /// initializers) or not, built by a first run when missing.
    fn plan_mode(&self, feeds: &[(&str, Tensor)], track: bool) -> Result<Arc<Plan>> {
        let key = (feeds.iter().map(|(_, t)| t.dims().to_vec()).collect::<Vec<_>>(), track);
        let cached = |g: &Graph| {
            g.plans.lock().map_err(|_| Error::onnx(&g.name, "plan cache poisoned")).map(|p| p.get(&key).cloned())
        };
        if let Some(p) = cached(self)? {
            return Ok(p);
        }
        self.run_mode(feeds, track)?;
        cached(self)?.ok_or_else(|| Error::onnx(&self.name, "no plan after a run"))
    }

    /// Runs the graph once (planning first if needed) and returns the time spent per op type, slowest
    /// first: where the importer's time goes.
    pub fn profile(&self, feeds: &[(&str, Tensor)]) -> Result<Vec<OpTime>> {
        self.profile_mode(feeds, false)
    }

    /// Like [`Graph::profile`], for the forward pass of training (`track`: gradients to the trainable
    /// initializers tracked).
    pub fn profile_mode(&self, feeds: &[(&str, Tensor)], track: bool) -> Result<Vec<OpTime>> {
        let plan = self.plan_mode(feeds, track)?;
        let mut times: HashMap<String, OpTime> = HashMap::new();
        // On a rayon worker, as planned runs are (run_plan), so the times are those of a real run.
        rayon::scope(|_| self.run_plan_timed(&plan, feeds, Some(&mut times)))?;
        let mut v: Vec<OpTime> = times.into_values().collect();
        v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        Ok(v)
    }

    /// Runs `plan` on one of rayon's worker threads: each parallel kernel then starts where the steps run
    /// and wakes only the other workers, instead of handing every op from an outside thread to the pool
    /// and sleeping until it is done (EfficientNet-Lite0 at batch 1: ~20% faster). Its tensors are then
    /// allocated on a worker thread: [`kernels::keep_freed_memory`] keeps glibc to one arena, without which
    /// that made batch-8 ResNet-50/DenseNet/PoolFormer 10-45% slower (docs/benchmarks.md, sessions 11-12).
    pub(super) fn run_plan(&self, plan: &Plan, feeds: &[(&str, Tensor)]) -> Result<Vec<Tensor>> {
        rayon::scope(|_| self.run_plan_timed(plan, feeds, None))
    }

    fn run_plan_timed(
        &self,
        plan: &Plan,
        feeds: &[(&str, Tensor)],
        mut times: Option<&mut HashMap<String, OpTime>>,
    ) -> Result<Vec<Tensor>> {
        let mut values: HashMap<String, Tensor> = feeds.iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
        let detail = times.is_some() && std::env::var_os("AUTOMM_PROFILE_DETAIL").is_some();
        for (s, &i) in plan.steps.iter().enumerate() {
            let node = &plan.nodes[i];
            let mut ins = self.node_inputs(node, |n| {
                values.get(n).or_else(|| plan.statics.get(n)).cloned().or_else(|| self.init_value(n, plan.track))
            })?;
            let t0 = std::time::Instant::now();
            let blocked_step = plan.blocked.steps.contains(&i);
            let reads_blocked = !blocked_step && node.input.iter().any(|n| plan.blocked.values.contains(n));
            let pool = plan.blocked.means.contains(&i);
            if reads_blocked && !pool {
                // Readers without a blocked kernel get NCHW.
                for (t, n) in ins.iter_mut().zip(&node.input) {
                    if let (Some(v), true) = (t.as_ref(), plan.blocked.values.contains(n)) {
                        *t = Some(layout::from_blocked(v)?);
                    }
                }
            }
            let outs = match plan.fused.get(&i) {
                _ if pool => {
                    let x = ins[0].as_ref().ok_or_else(|| ops::node_err(node, "input 0 is missing"))?;
                    vec![layout::global_avg_pool(x)?]
                }
                _ if blocked_step => {
                    let fused = plan.fused.get(&i);
                    let (name, t) = plan.blocked.run(self, i, node, fused, &ins, &plan.statics)?;
                    values.insert(name, t);
                    Vec::new()
                }
                None if node.op_type == "MatMul" => match self.matmul_const(plan, i, node, &ins, None, false)? {
                    Some(y) => vec![y],
                    None => ops::eval(node, &ins, self.opset, &self.device)?,
                },
                None => ops::eval(node, &ins, self.opset, &self.device)?,
                Some(f) => {
                    let (name, t) = self.run_fused(i, node, f, &ins, plan)?;
                    values.insert(name, t);
                    Vec::new()
                }
            };
            if let Some(times) = times.as_deref_mut() {
                let mut label = profile_label(node, &ins);
                if detail {
                    // Per input shape and layout: which instance of an op type is slow.
                    let dims: Vec<_> = ins.iter().flatten().map(|t| t.dims().to_vec()).collect();
                    label = format!("{label} {dims:?}{}", if blocked_step { " blocked" } else { "" });
                }
                let e = times.entry(label.clone()).or_insert_with(|| OpTime { op: label, count: 0, seconds: 0.0 });
                e.count += 1;
                e.seconds += t0.elapsed().as_secs_f64();
            }
            for (name, t) in node.output.iter().zip(outs) {
                if !name.is_empty() {
                    values.insert(name.clone(), t);
                }
            }
            for f in &plan.frees[s] {
                values.remove(f);
            }
        }
        for (k, v) in &plan.statics {
            if self.outputs.contains(k) {
                values.insert(k.clone(), v.clone());
            }
        }
        self.collect_outputs(&values)
    }

    /// An initializer's value; trainable ones detached unless `track`.
    fn init_value(&self, name: &str, track: bool) -> Option<Tensor> {
        let t = self.initializers.get(name)?;
        Some(if !track && self.trainable.contains(name) { t.detach() } else { t.clone() })
    }

    /// Runs a fused step; returns the name and value of the pattern's last output.
    fn run_fused(
        &self,
        i: usize,
        node: &NodeProto,
        f: &fuse::Fused,
        ins: &[Option<Tensor>],
        plan: &Plan,
    ) -> Result<(String, Tensor)> {
        let arg = |i: usize| {
            ins.get(i).cloned().flatten().ok_or_else(|| ops::node_err(node, format!("input {i} is missing")))
        };
        Ok(match f {
            fuse::Fused::ConvAct { lo, hi, epilogue, out } => {
                let b = ins.get(2).cloned().flatten();
                let y = ops::conv::conv_act(node, &arg(0)?, &arg(1)?, b.as_ref(), Some((*lo, *hi)))?;
                (out.clone(), ops::conv::epilogue(y, *epilogue)?)
            }
            fuse::Fused::MatMulBias { bias, out, gelu } => {
                let (a, b) = (arg(0)?, arg(1)?);
                let bias = plan.statics.get(bias).ok_or_else(|| ops::node_err(node, "fused bias missing"))?;
                if let Some(y) = self.matmul_const(plan, i, node, ins, Some(bias), *gelu)? {
                    return Ok((out.clone(), y));
                }
                let y = match kernels::matmul_bias(&a, &b, Some(bias))? {
                    Some(y) => y,
                    None => ops::matmul(&a, &b)?.broadcast_add(bias)?,
                };
                (out.clone(), if *gelu { ops::unary::gelu(&y)? } else { y })
            }
            fuse::Fused::Silu { out } => (out.clone(), ops::unary::silu(&arg(0)?)?),
            fuse::Fused::Gelu { out, .. } => (out.clone(), ops::unary::gelu(&arg(0)?)?),
        })
    }

    /// `a @ w (+ bias) (then GELU)` through the packed-matrix tiles when `w` (MatMul step `i`'s second input) is a
    /// plan constant 2-D f32 matrix and the CPU has the tiles; None otherwise (the caller's general path).
    fn matmul_const(
        &self,
        plan: &Plan,
        i: usize,
        node: &NodeProto,
        ins: &[Option<Tensor>],
        bias: Option<&Tensor>,
        gelu: bool,
    ) -> Result<Option<Tensor>> {
        use kernels::sgemm;
        let (Some(Some(a)), Some(w)) = (ins.first(), node.input.get(1).and_then(|n| plan.statics.get(n))) else {
            return Ok(None);
        };
        let ok = sgemm::available()
            && w.rank() == 2
            && w.dims()[0] > 0
            && a.rank() >= 2
            && a.dims().last() == Some(&w.dims()[0])
            && kernels::usable(&[a, w])
            && bias.is_none_or(|b| kernels::usable(&[b]) && b.elem_count() == w.dims()[1]);
        if !ok {
            return Ok(None);
        }
        let cached = self.lock_packed(plan)?.get(&i).cloned();
        let packed = match cached {
            Some(p) => p,
            None => {
                let (k, n) = (w.dims()[0], w.dims()[1]);
                let p = Arc::new(kernels::with_data(w, |ws| sgemm::PackedB::new(ws, k, n))?);
                self.lock_packed(plan)?.insert(i, p.clone());
                p
            }
        };
        let bias_v = bias.map(|b| b.flatten_all().and_then(|b| b.to_vec1::<f32>())).transpose()?;
        let after = |rows: &mut [f32]| {
            if gelu {
                kernels::gelu_in_place(rows)
            }
        };
        let y = kernels::with_data(a, |av| sgemm::matmul_packed(av, &packed, bias_v.as_deref(), &after))?;
        let mut dims = a.dims().to_vec();
        *dims.last_mut().unwrap_or(&mut 0) = packed.n();
        Ok(Some(kernels::tensor(y, &dims)?))
    }

    fn lock_packed<'a>(
        &self,
        plan: &'a Plan,
    ) -> Result<std::sync::MutexGuard<'a, HashMap<usize, Arc<kernels::sgemm::PackedB>>>> {
        plan.packed_matrices.lock().map_err(|_| Error::onnx(&self.name, "packed matrix cache poisoned"))
    }
}

/// The profile's row for a node: its op type, with convolutions split by kind (1x1, depthwise, kernel
/// size and stride) and matrix products by operand (one matrix, or batches of them), since they cost very
/// differently.
fn profile_label(node: &NodeProto, ins: &[Option<Tensor>]) -> String {
    let w = ins.get(1).and_then(|w| w.as_ref());
    match (node.op_type.as_str(), w) {
        ("Conv", Some(w)) if w.rank() == 4 => {
            let d = w.dims();
            let at = ops::Attrs(node);
            let group = at.int("group", 1);
            let stride = at.ints("strides").and_then(|s| s.first().copied()).unwrap_or(1);
            let kind = if group > 1 && d[1] == 1 { "dw " } else { "" };
            format!("Conv {kind}{}x{} s{stride}", d[2], d[3])
        }
        ("MatMul", Some(b)) if b.rank() == 2 => "MatMul by a matrix".into(),
        ("MatMul", Some(_)) => "MatMul batched".into(),
        _ => node.op_type.clone(),
    }
}
