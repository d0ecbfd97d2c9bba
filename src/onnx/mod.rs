//! Our ONNX importer, the engine every stage above runs graphs on (it imports only `util`/`error`): parse
//! a model with candle-onnx's protobuf types (`model`: reading, feature tensor, node order), load every
//! initializer once onto the candle device, and evaluate the graph with our own operators ([`ops`],
//! registered by family) and kernels ([`kernels`]).
//!
//! Per distinct input shape, the first run builds a plan (`plan`, with the fusions of `fuse` and the
//! channel-blocked layout of `layout`): everything that does not depend on the
//! input's values (initializers, Constant nodes, Shape-of-anything and the shape arithmetic built on it,
//! transposes of weights) is computed once and kept; later runs execute only the remaining nodes and
//! free each intermediate after its last use.

mod fuse;
pub mod kernels;
mod layout;
mod model;
pub mod ops;
mod plan;
pub mod tensor;

pub(crate) use model::toposort_pruned;
pub use model::{detect_feature_tensor, metadata_value, opset_of, read_model, read_npy, value_dims};
use model::{fmt_dims, input_type_error, resolve_cast_like, unsupported_ops};
pub use plan::{OpTime, PlanStats};
use plan::{Plan, PlanKey};

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use candle_onnx::onnx::{ModelProto, NodeProto};

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
        if let Some(e) = g.input.iter().filter(|i| !init_names.contains(i.name.as_str())).find_map(input_type_error) {
            return Err(Error::onnx(name, e));
        }
        let outputs = outputs.unwrap_or_else(|| g.output.iter().map(|o| o.name.clone()).collect());
        let mut nodes = toposort_pruned(name, &g.node, &outputs, &inputs, &init_names)?;
        resolve_cast_like(&mut nodes, g);
        let unsupported = unsupported_ops(&nodes);
        if !unsupported.is_empty() {
            let list: Vec<String> = unsupported.iter().map(|(op, n)| format!("{op} (e.g. node `{n}`)")).collect();
            return Err(Error::onnx(name, format!("unsupported op types: {}", list.join(", "))));
        }
        // No attribute is ignored: one an op does not implement fails the load, naming node and value.
        for n in &nodes {
            ops::attrs::check(n).map_err(|e| e.in_model(name))?;
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
        self.run_mode_inner(feeds, track).map_err(|e| e.in_model(&self.name))
    }

    fn run_mode_inner(&self, feeds: &[(&str, Tensor)], track: bool) -> Result<Vec<Tensor>> {
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

    fn collect_outputs(&self, values: &HashMap<String, Tensor>) -> Result<Vec<Tensor>> {
        self.outputs
            .iter()
            .map(|o| {
                values.get(o).cloned().ok_or_else(|| Error::onnx(&self.name, format!("output `{o}` was not computed")))
            })
            .collect()
    }
}
