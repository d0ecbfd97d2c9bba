//! Our ONNX importer: parse a model with candle-onnx's protobuf types, load every initializer once onto
//! the candle device, and evaluate the graph with our own operators ([`ops`]).
//!
//! Per distinct input shape, the first run builds a [`Plan`]: everything that does not depend on the
//! input's values (initializers, Constant nodes, Shape-of-anything and the shape arithmetic built on it,
//! transposes of weights) is computed once and kept; later runs execute only the remaining nodes and
//! free each intermediate after its last use.

mod conv;
mod fuse;
pub mod kernels;
mod layout;
pub mod ops;
pub mod tensor;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use candle_onnx::onnx::{ModelProto, NodeProto};
use prost::Message;

use crate::error::{Error, Result};

/// Largest ONNX file accepted (protobuf's own limit is 2 GiB).
pub const MAX_MODEL_BYTES: u64 = 2 << 30;

/// A graph input that is not an initializer.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    /// Its name.
    pub name: String,
    /// Its dims; None where symbolic (e.g. the batch axis).
    pub dims: Vec<Option<usize>>,
}

/// Reads and decodes an ONNX file.
pub fn read_model(path: &Path) -> Result<ModelProto> {
    let what = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > MAX_MODEL_BYTES {
        return Err(Error::onnx(what, format!("file is {} bytes; the ONNX limit is 2 GiB", meta.len())));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut model = ModelProto::decode(bytes.as_slice())
        .map_err(|e| Error::onnx(&what, format!("not a valid ONNX protobuf: {e}")))?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Some(g) = model.graph.as_mut() {
        for t in g.initializer.iter_mut() {
            tensor::inline_external_data(t, dir).map_err(|msg| Error::onnx(&what, msg))?;
        }
    }
    Ok(model)
}

/// The default-domain opset of a model.
pub fn opset_of(model: &ModelProto) -> i64 {
    model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map(|o| o.version).unwrap_or(13)
}

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
struct Plan {
    statics: HashMap<String, Tensor>,
    steps: Vec<usize>,
    /// Steps that run a fused pattern (by node index).
    fused: HashMap<usize, fuse::Fused>,
    /// For each step, the values whose last use it is.
    frees: Vec<Vec<String>>,
    /// Whether trainable initializers are read as tracked `Var`s (else detached).
    track: bool,
    /// Steps and values kept channel-blocked (CPU inference plans only).
    blocked: layout::Blocked,
    /// Packed constant matrices of MatMul steps, by node index (filled on first use).
    packed_matrices: Mutex<HashMap<usize, Arc<kernels::sgemm::PackedB>>>,
}

/// Input shapes, and whether trainable initializers are tracked.
type PlanKey = (Vec<Vec<usize>>, bool);

/// An imported ONNX graph, evaluated on a candle device.
pub struct Graph {
    name: String,
    nodes: Vec<NodeProto>,
    initializers: HashMap<String, Tensor>,
    inputs: Vec<InputSpec>,
    outputs: Vec<String>,
    opset: i64,
    device: Device,
    /// Initializers being trained (their tensors in `initializers` are `Var`s): never constant-folded.
    trainable: HashSet<String>,
    /// Plans by input shapes and by whether gradients are tracked (fused kernels only when not).
    plans: Mutex<HashMap<PlanKey, Arc<Plan>>>,
}

impl Graph {
    /// Loads `path` onto `device`, keeping only what `outputs` need (all graph outputs when None).
    pub fn load(path: &Path, device: &Device, outputs: Option<Vec<String>>) -> Result<Graph> {
        let model = read_model(path)?;
        Self::from_model(&model, &path.display().to_string(), device, outputs)
    }

    /// Builds from a decoded model.
    pub fn from_model(model: &ModelProto, name: &str, device: &Device, outputs: Option<Vec<String>>) -> Result<Graph> {
        let g = model.graph.as_ref().ok_or_else(|| Error::onnx(name, "the model has no graph"))?;
        let opset = opset_of(model);
        let init_names: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs: Vec<InputSpec> = g
            .input
            .iter()
            .filter(|i| !init_names.contains(i.name.as_str()))
            .map(|i| InputSpec { name: i.name.clone(), dims: value_dims(i) })
            .collect();
        let outputs = outputs.unwrap_or_else(|| g.output.iter().map(|o| o.name.clone()).collect());
        let nodes = toposort_pruned(name, &g.node, &outputs, &inputs, &init_names)?;
        let unsupported = unsupported_ops(&nodes);
        if !unsupported.is_empty() {
            let list: Vec<String> = unsupported.iter().map(|(op, n)| format!("{op} (e.g. node `{n}`)")).collect();
            return Err(Error::onnx(name, format!("unsupported op types: {}", list.join(", "))));
        }
        let used: HashSet<&str> = nodes
            .iter()
            .flat_map(|n| n.input.iter().map(String::as_str))
            .chain(outputs.iter().map(String::as_str))
            .collect();
        let mut initializers = HashMap::new();
        for t in &g.initializer {
            if used.contains(t.name.as_str()) {
                initializers.insert(t.name.clone(), tensor::from_proto(t, device)?);
            }
        }
        Ok(Graph {
            name: name.to_string(),
            nodes,
            initializers,
            inputs,
            outputs,
            opset,
            device: device.clone(),
            trainable: HashSet::new(),
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// Like [`Graph::from_model`], but with `inputs` (values computed inside the model, e.g. a frozen
    /// prefix's outputs) fed by the caller instead of the model's own inputs; their shapes are not checked.
    pub fn from_model_fed(
        model: &ModelProto,
        name: &str,
        device: &Device,
        inputs: &[String],
        outputs: Vec<String>,
    ) -> Result<Graph> {
        let mut m = model.clone();
        if let Some(mg) = m.graph.as_mut() {
            // The fed values become the graph's inputs; nodes that computed them are pruned by the sort.
            mg.input = inputs
                .iter()
                .map(|n| candle_onnx::onnx::ValueInfoProto { name: n.clone(), ..Default::default() })
                .collect();
            mg.node.retain(|n| !n.output.iter().any(|o| inputs.contains(o)));
        }
        Self::from_model(&m, name, device, Some(outputs))
    }

    /// The nodes this graph runs, in order.
    pub fn nodes(&self) -> &[NodeProto] {
        &self.nodes
    }

    /// Names of the initializers this graph reads.
    pub fn initializer_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.initializers.keys().cloned().collect();
        v.sort();
        v
    }

    /// The current value of an initializer.
    pub fn initializer(&self, name: &str) -> Option<&Tensor> {
        self.initializers.get(name)
    }

    /// Replaces an initializer's value (e.g. a fine-tuned one); its shape must not change.
    pub fn set_initializer(&mut self, name: &str, value: &Tensor) -> Result<()> {
        let old = self
            .initializers
            .get(name)
            .ok_or_else(|| Error::onnx(&self.name, format!("no initializer named `{name}` in the graph")))?;
        if old.dims() != value.dims() {
            return Err(Error::Shape {
                name: name.to_string(),
                msg: format!("the graph's initializer is {:?}, the new value {:?}", old.dims(), value.dims()),
            });
        }
        let v = value.to_dtype(old.dtype())?.to_device(&self.device)?;
        self.initializers.insert(name.to_string(), v);
        if let Ok(mut p) = self.plans.lock() {
            p.clear();
        }
        Ok(())
    }

    /// Makes the named initializers trainable: each becomes a `Var` (returned, in `names` order) that runs
    /// read and gradients reach. Unknown names are an error naming them.
    pub fn set_trainable(&mut self, names: &[String]) -> Result<Vec<candle_core::Var>> {
        let missing: Vec<&String> = names.iter().filter(|n| !self.initializers.contains_key(*n)).collect();
        if !missing.is_empty() {
            return Err(Error::onnx(&self.name, format!("no initializer named {missing:?} in the graph")));
        }
        let mut vars = Vec::new();
        for n in names {
            let v = candle_core::Var::from_tensor(&self.initializers[n].to_dtype(candle_core::DType::F32)?)?;
            self.initializers.insert(n.clone(), v.as_tensor().clone());
            self.trainable.insert(n.clone());
            vars.push(v);
        }
        if let Ok(mut p) = self.plans.lock() {
            p.clear();
        }
        Ok(vars)
    }

    /// The values a frozen prefix hands to the trainable rest: computed from the graph inputs without any
    /// trainable initializer, and read by a node that depends on one. Empty when nothing is trainable.
    pub fn frontier(&self) -> Vec<String> {
        let input_names: HashSet<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
        let mut dep_input: HashSet<&str> = input_names.clone();
        let mut dep_train: HashSet<&str> = self.trainable.iter().map(String::as_str).collect();
        let mut front: Vec<String> = Vec::new();
        for n in &self.nodes {
            let ins = n.input.iter().map(String::as_str).filter(|s| !s.is_empty());
            let (mut d, mut t) = (false, false);
            for i in ins.clone() {
                d |= dep_input.contains(i);
                t |= dep_train.contains(i);
            }
            if t {
                for i in ins {
                    if dep_input.contains(i) && !dep_train.contains(i) && !front.iter().any(|f| f == i) {
                        front.push(i.to_string());
                    }
                }
            }
            for o in &n.output {
                if d {
                    dep_input.insert(o.as_str());
                }
                if t {
                    dep_train.insert(o.as_str());
                }
            }
        }
        front
    }

    /// The graph inputs that are not initializers.
    pub fn inputs(&self) -> &[InputSpec] {
        &self.inputs
    }

    /// The outputs this graph computes.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the graph on named inputs and returns the outputs in [`Graph::outputs`] order.
    pub fn run(&self, feeds: &[(&str, Tensor)]) -> Result<Vec<Tensor>> {
        for spec in &self.inputs {
            let t = feeds.iter().find(|(n, _)| *n == spec.name).map(|(_, t)| t).ok_or_else(|| Error::Shape {
                name: spec.name.clone(),
                msg: "this graph input was not given".into(),
            })?;
            // Inputs without shape information (empty dims) are not checked.
            let ok = spec.dims.is_empty()
                || t.rank() == spec.dims.len()
                    && spec.dims.iter().zip(t.dims()).all(|(d, &x)| d.is_none_or(|d| d == x));
            if !ok {
                return Err(Error::Shape {
                    name: spec.name.clone(),
                    msg: format!("expected shape {} , got {:?}", fmt_dims(&spec.dims), t.dims()),
                });
            }
        }
        self.run_mode(feeds, !self.trainable.is_empty())
    }

    /// Runs with the trainable initializers' current values as constants (no gradients; the fast fused
    /// kernels): validation and prediction during fine-tuning.
    pub fn run_frozen(&self, feeds: &[(&str, Tensor)]) -> Result<Vec<Tensor>> {
        self.run_mode(feeds, false)
    }

    fn run_mode(&self, feeds: &[(&str, Tensor)], track: bool) -> Result<Vec<Tensor>> {
        let key = (feeds.iter().map(|(_, t)| t.dims().to_vec()).collect::<Vec<_>>(), track);
        let plan = self.plans.lock().map_err(|_| Error::onnx(&self.name, "plan cache poisoned"))?.get(&key).cloned();
        match plan {
            Some(p) => self.run_plan(&p, feeds),
            None => {
                let (outs, plan) = self.build_plan(feeds, track)?;
                if let Ok(mut plans) = self.plans.lock() {
                    plans.insert(key, Arc::new(plan));
                }
                Ok(outs)
            }
        }
    }

    fn node_inputs(&self, node: &NodeProto, lookup: impl Fn(&str) -> Option<Tensor>) -> Result<Vec<Option<Tensor>>> {
        node.input
            .iter()
            .map(|n| {
                if n.is_empty() {
                    Ok(None)
                } else {
                    lookup(n).map(Some).ok_or_else(|| {
                        Error::onnx(
                            &self.name,
                            format!("node `{}` ({}) reads `{n}`, which no node computes", node.name, node.op_type),
                        )
                    })
                }
            })
            .collect()
    }

    /// Runs every node once, recording which values are input-independent.
    fn build_plan(&self, feeds: &[(&str, Tensor)], track: bool) -> Result<(Vec<Tensor>, Plan)> {
        let mut values: HashMap<String, Tensor> =
            self.initializers.keys().filter_map(|k| self.init_value(k, track).map(|t| (k.clone(), t))).collect();
        let mut is_static: HashSet<String> =
            self.initializers.keys().filter(|k| !self.trainable.contains(*k)).cloned().collect();
        for (n, t) in feeds {
            values.insert(n.to_string(), t.clone());
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
        let statics: HashMap<String, Tensor> = values
            .into_iter()
            .filter(|(k, _)| is_static.contains(k) && needed.contains(k.as_str()))
            .map(|(k, t)| t.contiguous().map(|t| (k, t)))
            .collect::<candle_core::Result<_>>()?;
        // Fused kernels are inference-only: keep every node when gradients are tracked or off the CPU.
        let tracked = feeds.iter().any(|(_, t)| t.track_op()) || (track && !self.trainable.is_empty());
        let (steps, fused, blocked) = if self.device.is_cpu() && !tracked {
            let (steps, fused) = fuse::fuse(&self.nodes, &steps, &statics, &self.outputs, self.opset);
            let blocked = layout::plan(&self.nodes, &steps, &fused, &statics, &self.outputs);
            (steps, fused, blocked)
        } else {
            (steps, HashMap::new(), layout::Blocked::default())
        };
        let frees = self.last_uses(&steps, &statics);
        Ok((outs, Plan { statics, steps, fused, frees, track, blocked, packed_matrices: Mutex::default() }))
    }

    fn last_uses(&self, steps: &[usize], statics: &HashMap<String, Tensor>) -> Vec<Vec<String>> {
        let mut last: HashMap<&str, usize> = HashMap::new();
        for (s, &i) in steps.iter().enumerate() {
            for n in &self.nodes[i].input {
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
        let key = (feeds.iter().map(|(_, t)| t.dims().to_vec()).collect::<Vec<_>>(), false);
        let cached = |g: &Graph| {
            g.plans.lock().map_err(|_| Error::onnx(&g.name, "plan cache poisoned")).map(|p| p.get(&key).cloned())
        };
        if let Some(p) = cached(self)? {
            return Ok(p);
        }
        self.run_frozen(feeds)?;
        cached(self)?.ok_or_else(|| Error::onnx(&self.name, "no plan after a run"))
    }

    /// Runs the graph once (planning first if needed) and returns the time spent per op type, slowest
    /// first: where the importer's time goes.
    pub fn profile(&self, feeds: &[(&str, Tensor)]) -> Result<Vec<OpTime>> {
        let plan = self.plan_for(feeds)?;
        let mut times: HashMap<String, OpTime> = HashMap::new();
        self.run_plan_timed(&plan, feeds, Some(&mut times))?;
        let mut v: Vec<OpTime> = times.into_values().collect();
        v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        Ok(v)
    }

    fn run_plan(&self, plan: &Plan, feeds: &[(&str, Tensor)]) -> Result<Vec<Tensor>> {
        self.run_plan_timed(plan, feeds, None)
    }

    fn run_plan_timed(
        &self,
        plan: &Plan,
        feeds: &[(&str, Tensor)],
        mut times: Option<&mut HashMap<String, OpTime>>,
    ) -> Result<Vec<Tensor>> {
        let mut values: HashMap<String, Tensor> = feeds.iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
        for (s, &i) in plan.steps.iter().enumerate() {
            let node = &self.nodes[i];
            let mut ins = self.node_inputs(node, |n| {
                values.get(n).or_else(|| plan.statics.get(n)).cloned().or_else(|| self.init_value(n, plan.track))
            })?;
            let t0 = std::time::Instant::now();
            let blocked_step = plan.blocked.steps.contains(&i);
            let reads_blocked = !blocked_step && node.input.iter().any(|n| plan.blocked.values.contains(n));
            let pool = reads_blocked && node.op_type == "GlobalAveragePool" && !plan.fused.contains_key(&i);
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
                let label = profile_label(node, &ins);
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
            fuse::Fused::ConvAct { lo, hi, out } => {
                let b = ins.get(2).cloned().flatten();
                (out.clone(), conv::conv_act(node, &arg(0)?, &arg(1)?, b.as_ref(), Some((*lo, *hi)))?)
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
                let y = match (*gelu, kernels::usable(&[&y])) {
                    (true, true) => kernels::unary(kernels::Unary::Gelu, &y)?,
                    (true, false) => y.gelu_erf()?,
                    (false, _) => y,
                };
                (out.clone(), y)
            }
            fuse::Fused::Gelu { out, .. } => {
                let x = arg(0)?;
                let y = if kernels::usable(&[&x]) { kernels::unary(kernels::Unary::Gelu, &x)? } else { x.gelu_erf()? };
                (out.clone(), y)
            }
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

    fn collect_outputs(&self, values: &HashMap<String, Tensor>) -> Result<Vec<Tensor>> {
        self.outputs
            .iter()
            .map(|o| {
                values.get(o).cloned().ok_or_else(|| Error::onnx(&self.name, format!("output `{o}` was not computed")))
            })
            .collect()
    }
}

fn fmt_dims(d: &[Option<usize>]) -> String {
    let parts: Vec<String> = d.iter().map(|x| x.map(|v| v.to_string()).unwrap_or_else(|| "N".into())).collect();
    format!("[{}]", parts.join(", "))
}

/// Dims of a graph value (None for symbolic or unknown dims).
pub fn value_dims(v: &candle_onnx::onnx::ValueInfoProto) -> Vec<Option<usize>> {
    use candle_onnx::onnx::{tensor_shape_proto::dimension::Value as Dim, type_proto::Value as Ty};
    match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(Ty::TensorType(tt)) => tt
            .shape
            .as_ref()
            .map(|s| {
                s.dim
                    .iter()
                    .map(|d| match d.value {
                        Some(Dim::DimValue(x)) if x > 0 => Some(x as usize),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Op types of `nodes` that [`ops::eval`] lacks, each with one node name.
fn unsupported_ops(nodes: &[NodeProto]) -> Vec<(String, String)> {
    let mut seen: Vec<(String, String)> = Vec::new();
    for n in nodes {
        let custom_domain = !(n.domain.is_empty() || n.domain == "ai.onnx");
        if (custom_domain || !ops::supported(&n.op_type)) && !seen.iter().any(|(o, _)| *o == n.op_type) {
            let op = if custom_domain { format!("{}::{}", n.domain, n.op_type) } else { n.op_type.clone() };
            seen.push((op, n.name.clone()));
        }
    }
    seen
}

/// Orders the nodes needed for `outputs` topologically; errors on cycles and on values nothing makes.
pub(crate) fn toposort_pruned(
    name: &str,
    nodes: &[NodeProto],
    outputs: &[String],
    inputs: &[InputSpec],
    inits: &HashSet<&str>,
) -> Result<Vec<NodeProto>> {
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for o in &n.output {
            if !o.is_empty() {
                producer.insert(o.as_str(), i);
            }
        }
    }
    let is_source = |v: &str| inits.contains(v) || inputs.iter().any(|i| i.name == v);
    // Iterative DFS with colours: 1 = on stack, 2 = done.
    let mut state = vec![0u8; nodes.len()];
    let mut order = Vec::new();
    for out in outputs {
        if is_source(out) {
            continue;
        }
        let &start = producer
            .get(out.as_str())
            .ok_or_else(|| Error::onnx(name, format!("no node computes the requested tensor `{out}`")))?;
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        while let Some((i, k)) = stack.pop() {
            if k == 0 {
                if state[i] == 2 {
                    continue;
                }
                state[i] = 1;
            }
            let node = &nodes[i];
            let mut pushed = false;
            for (j, inp) in node.input.iter().enumerate().skip(k) {
                if inp.is_empty() || is_source(inp) {
                    continue;
                }
                let &p = producer.get(inp.as_str()).ok_or_else(|| {
                    Error::onnx(
                        name,
                        format!(
                            "node `{}` ({}) reads `{inp}`, which is neither an input, an initializer nor a node output",
                            node.name, node.op_type
                        ),
                    )
                })?;
                match state[p] {
                    1 => {
                        return Err(Error::onnx(
                            name,
                            format!("the graph has a cycle through node `{}`", nodes[p].name),
                        ))
                    }
                    0 => {
                        stack.push((i, j + 1));
                        stack.push((p, 0));
                        pushed = true;
                        break;
                    }
                    _ => {}
                }
            }
            if !pushed {
                state[i] = 2;
                order.push(i);
            }
        }
    }
    Ok(order.into_iter().map(|i| nodes[i].clone()).collect())
}

/// Picks the feature tensor of a classification graph: the input of the final classifier (Gemm, or
/// MatMul with an optional bias Add) fed by a 2-D initializer; else the graph's first output.
pub fn detect_feature_tensor(model: &ModelProto) -> Result<String> {
    let g = model.graph.as_ref().ok_or_else(|| Error::onnx("model", "no graph"))?;
    let out = g.output.first().ok_or_else(|| Error::onnx("model", "the graph has no outputs"))?.name.clone();
    let inits: HashMap<&str, &candle_onnx::onnx::TensorProto> =
        g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let producer = |v: &str| g.node.iter().find(|n| n.output.iter().any(|o| o == v));
    let mut cur = out.clone();
    // Walk back through a bias Add / Identity / Flatten-free tail to the classifier.
    for _ in 0..3 {
        let Some(n) = producer(&cur) else { break };
        match n.op_type.as_str() {
            "Gemm" | "MatMul"
                if n.input.len() >= 2 && inits.get(n.input[1].as_str()).is_some_and(|t| t.dims.len() == 2) =>
            {
                return Ok(n.input[0].clone());
            }
            "Add" | "Identity" => {
                let next = n.input.iter().find(|i| !inits.contains_key(i.as_str()));
                match next {
                    Some(v) => cur = v.clone(),
                    None => break,
                }
            }
            _ => break,
        }
    }
    Ok(out)
}

/// Reads an `.npy` file as a float32 tensor.
pub fn read_npy(path: &Path) -> Result<Tensor> {
    Tensor::read_npy(path)
        .map_err(|e| Error::Shape { name: path.display().to_string(), msg: format!("not a readable .npy array: {e}") })?
        .to_dtype(candle_core::DType::F32)
        .map_err(Error::from)
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
