//! Reading ONNX files: decoding (size-checked), the opset, value dims, the supported-op check, the
//! pruned topological order of the nodes an output needs, the feature tensor of a classifier, `.npy`
//! inputs.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::Tensor;
use candle_onnx::onnx::{ModelProto, NodeProto};
use prost::Message;

use super::*;
use crate::error::{Error, Result};

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

/// The value of metadata key `key` (`metadata_props`) of the ONNX file at `path`, if it has one.
pub fn metadata_value(path: &Path, key: &str) -> Result<Option<String>> {
    let model = read_model(path)?;
    Ok(model.metadata_props.iter().find(|p| p.key == key).map(|p| p.value.clone()))
}

/// The default-domain opset of a model.
pub fn opset_of(model: &ModelProto) -> i64 {
    model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map(|o| o.version).unwrap_or(13)
}

pub(super) fn fmt_dims(d: &[Option<usize>]) -> String {
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

/// Why automm cannot take a graph input `v`, or None when its element type is one it reads: a value
/// of another type (string, complex, float8, 4-bit, a sequence) is refused when the graph loads.
pub(super) fn input_type_error(v: &candle_onnx::onnx::ValueInfoProto) -> Option<String> {
    use candle_onnx::onnx::type_proto::Value as Ty;
    match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        None => None,
        Some(Ty::TensorType(tt)) => match super::tensor::dtype_of_code(tt.elem_type as i64) {
            Some(_) => None,
            None => {
                let name = super::ops::attrs::type_name(tt.elem_type as i64);
                Some(format!("input `{}` has element type {name}, which automm does not read", v.name))
            }
        },
        Some(_) => {
            Some(format!("input `{}` is not a tensor (sequences, maps and optionals are not supported)", v.name))
        }
    }
}

/// Rewrites each CastLike whose `like` has a declared type (a graph input, an initializer, or a
/// value_info entry) into a Cast to that type: automm widens float16/bfloat16 values to float32, so
/// the run-time dtype of `like` would not say that the result must be rounded to half precision.
pub(super) fn resolve_cast_like(nodes: &mut [NodeProto], g: &candle_onnx::onnx::GraphProto) {
    use candle_onnx::onnx::{attribute_proto::AttributeType, type_proto::Value as Ty, AttributeProto};
    let declared = |name: &str| -> Option<i32> {
        let from_value = g.input.iter().chain(&g.value_info).find(|v| v.name == name).and_then(|v| {
            match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(Ty::TensorType(tt)) if tt.elem_type != 0 => Some(tt.elem_type),
                _ => None,
            }
        });
        from_value.or_else(|| g.initializer.iter().find(|t| t.name == name).map(|t| t.data_type))
    };
    for n in nodes.iter_mut().filter(|n| n.op_type == "CastLike" && n.input.len() == 2) {
        if let Some(to) = declared(&n.input[1]) {
            n.op_type = "Cast".into();
            n.input.truncate(1);
            n.attribute.push(AttributeProto {
                name: "to".into(),
                r#type: AttributeType::Int as i32,
                i: to as i64,
                ..Default::default()
            });
        }
    }
}

/// Op types of `nodes` that [`ops::eval`] lacks, each with one node name.
pub(super) fn unsupported_ops(nodes: &[NodeProto]) -> Vec<(String, String)> {
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
