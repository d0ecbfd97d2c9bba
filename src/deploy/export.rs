//! Writing a trained model back to ONNX (protobuf written by our code with candle-onnx's prost types):
//! the backbone graph up to the feature tensor + the trained head (MatMul + Add) + Softmax, or the head
//! alone, or with preprocessing inside the graph for edge clients. Metadata carries class labels,
//! preprocessing, loss and hyperparameters, the automm version and the backbone's sha256. Writing is
//! atomic, and `verify` checks the written file before it is moved into place.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use prost::Message;
use serde::Serialize;

use crate::deploy::meta::{keys, ExportKind, LOGITS, PROBABILITIES};
use crate::error::{Error, Result};
use crate::model::hparams::LossKind;
use crate::model::{Head, ModelConfig, ModelDir, VERSION};
use crate::onnx::{opset_of, read_model, tensor::f32_to_proto};
use crate::util::fs::stage_atomic;

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: name.into(), i: v, r#type: AttributeType::Int as i32, ..Default::default() }
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), ints: v.to_vec(), r#type: AttributeType::Ints as i32, ..Default::default() }
}

fn node(op: &str, name: &str, ins: &[&str], outs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: outs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

/// A tensor value description; `None` dims are the symbolic batch axis.
fn value_info(name: &str, elem: DataType, dims: &[Option<usize>]) -> ValueInfoProto {
    use tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(x) => Value::DimValue(*x as i64),
                None => Value::DimParam("batch".into()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Ops whose inputs/attributes changed meaning at an opset version (crossing it changes the graph).
const BREAKING: &[(i64, &[&str])] = &[
    (13, &["Unsqueeze", "Squeeze", "ReduceSum", "Split", "Softmax", "LogSoftmax", "Hardmax"]),
    (
        18,
        &[
            "ReduceMean",
            "ReduceMax",
            "ReduceMin",
            "ReduceProd",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceSumSquare",
            "Split",
            "Pad",
        ],
    ),
];

/// The newest opset a graph is relabelled to: [`BREAKING`] lists the operator changes up to here (later
/// opsets change operators automm does not check, and a runtime may not know them yet).
pub const MAX_RELABEL_OPSET: i64 = 21;

/// Checks a graph of `from` opset can be relabelled `to` without an op changing meaning.
fn check_opset(nodes: &[NodeProto], from: i64, to: i64) -> Result<()> {
    if to < 13 {
        return Err(Error::config("--opset", format!("{to} is too old; automm writes opset 13 or newer")));
    }
    if to != from && to > MAX_RELABEL_OPSET {
        return Err(Error::config(
            "--opset",
            format!("{to} is newer than automm can relabel a graph to; give 13 to {MAX_RELABEL_OPSET}, or leave it out to keep the backbone's opset {from}"),
        ));
    }
    let (lo, hi) = (from.min(to), from.max(to));
    for (v, ops) in BREAKING {
        if lo < *v && *v <= hi {
            if let Some(n) = nodes.iter().find(|n| ops.contains(&n.op_type.as_str())) {
                return Err(Error::config(
                    "--opset",
                    format!("cannot move this graph from opset {from} to {to}: {} (node `{}`) changed at opset {v}; keep the backbone's opset {from}", n.op_type, n.name),
                ));
            }
        }
    }
    Ok(())
}

fn metadata(cfg: &ModelConfig, kind: ExportKind, input: &str) -> Result<Vec<StringStringEntryProto>> {
    let j = |v: &dyn erased::Json| v.json();
    let hp = &cfg.hyperparameters;
    let loss = match hp.loss_function {
        LossKind::FocalLoss => {
            format!("focal_loss(alpha={:?}, gamma={}, reduction={})", cfg.alpha, hp.focal_gamma, hp.focal_reduction)
        }
        LossKind::CrossEntropy => format!("cross_entropy(label_smoothing={})", hp.label_smoothing),
        LossKind::LogitAdjusted => format!("logit_adjusted(tau={})", hp.logit_tau),
        LossKind::Auto => "auto".to_string(),
    };
    let entries = [
        (keys::CLASSES, j(&cfg.classes)?),
        (keys::PREPROCESS, j(&cfg.preprocess)?),
        (keys::HYPERPARAMETERS, j(hp)?),
        (keys::LOSS, loss),
        (keys::VERSION, VERSION.to_string()),
        (keys::BACKBONE_SHA256, cfg.backbone.sha256.clone()),
        (keys::KIND, kind.name().to_string()),
        (keys::INPUT, input.to_string()),
    ];
    Ok(entries.into_iter().map(|(k, v)| StringStringEntryProto { key: k.into(), value: v }).collect())
}

/// serde_json through a trait object, so `metadata` can list heterogeneous values.
mod erased {
    use crate::error::{Error, Result};
    pub trait Json {
        fn json(&self) -> Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> Result<String> {
            serde_json::to_string(self).map_err(|e| Error::encode("export metadata", e))
        }
    }
}

/// Appends the head (`Flatten -> MatMul -> Add -> Softmax`) reading `features`.
fn head_nodes(g: &mut GraphProto, head: &Head, features: &str) -> Result<()> {
    let taken: HashSet<String> =
        g.node.iter().flat_map(|n| n.output.iter().cloned()).chain(g.input.iter().map(|i| i.name.clone())).collect();
    for n in
        [LOGITS, PROBABILITIES, "automm_features", "automm_head_weight_t", "automm_head_bias", "automm_head_matmul"]
    {
        if taken.contains(n) && n != features {
            return Err(Error::onnx(
                "export",
                format!("the backbone already has a tensor named `{n}`, which the head needs"),
            ));
        }
    }
    g.initializer.push(f32_to_proto("automm_head_weight_t", &head.weight.t()?.contiguous()?)?);
    g.initializer.push(f32_to_proto("automm_head_bias", &head.bias)?);
    g.node.push(node("Flatten", "automm_flatten", &[features], &["automm_features"], vec![attr_int("axis", 1)]));
    g.node.push(node(
        "MatMul",
        "automm_head_matmul",
        &["automm_features", "automm_head_weight_t"],
        &["automm_head_matmul"],
        vec![],
    ));
    g.node.push(node("Add", "automm_head_add", &["automm_head_matmul", "automm_head_bias"], &[LOGITS], vec![]));
    g.node.push(node("Softmax", "automm_softmax", &[LOGITS], &[PROBABILITIES], vec![attr_int("axis", -1)]));
    let c = head.weight.dims()[0];
    g.output = vec![
        value_info(LOGITS, DataType::Float, &[None, Some(c)]),
        value_info(PROBABILITIES, DataType::Float, &[None, Some(c)]),
    ];
    Ok(())
}

/// Builds the export in memory.
/// `update` holds fine-tuned backbone initializers, written over the backbone's own values.
pub fn build(
    cfg: &ModelConfig,
    head: &Head,
    update: &[(String, candle_core::Tensor)],
    kind: ExportKind,
    opset: Option<i64>,
) -> Result<ModelProto> {
    let d = cfg.backbone.feature_dim;
    let s = cfg.preprocess.size as usize;
    if kind == ExportKind::HeadOnly {
        let opset = opset.unwrap_or(17);
        check_opset(&[], 17, opset)?;
        let mut g = GraphProto {
            name: "automm_head".into(),
            input: vec![value_info("features", DataType::Float, &[None, Some(d)])],
            ..Default::default()
        };
        head_nodes(&mut g, head, "features")?;
        return Ok(model_proto(g, opset, metadata(cfg, kind, "features")?));
    }
    let bpath = &cfg.backbone.path;
    let mut src = read_model(bpath)?;
    if let Some(g) = src.graph.as_mut() {
        for (name, t) in update {
            let slot = g.initializer.iter_mut().find(|i| &i.name == name).ok_or_else(|| {
                Error::onnx(
                    bpath.display().to_string(),
                    format!("fine-tuned initializer `{name}` is not in the backbone"),
                )
            })?;
            if slot.dims.iter().map(|&d| d as usize).collect::<Vec<_>>() != t.dims() {
                return Err(Error::Shape {
                    name: name.clone(),
                    msg: format!("backbone has {:?}, the fine-tuned value {:?}", slot.dims, t.dims()),
                });
            }
            *slot = f32_to_proto(name, t)?;
        }
    }
    let from = opset_of(&src);
    let g0 = src.graph.as_ref().ok_or_else(|| Error::onnx(bpath.display().to_string(), "no graph"))?;
    let inits: HashSet<&str> = g0.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<crate::onnx::InputSpec> = g0
        .input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .map(|i| crate::onnx::InputSpec { name: i.name.clone(), dims: crate::onnx::value_dims(i) })
        .collect();
    let feature = cfg.backbone.feature_tensor.clone();
    let nodes = crate::onnx::toposort_pruned(
        &bpath.display().to_string(),
        &g0.node,
        std::slice::from_ref(&feature),
        &inputs,
        &inits,
    )?;
    let opset = opset.unwrap_or(from);
    check_opset(&nodes, from, opset)?;
    let used: HashSet<&str> = nodes.iter().flat_map(|n| n.input.iter().map(String::as_str)).collect();
    let initializer: Vec<TensorProto> =
        g0.initializer.iter().filter(|t| used.contains(t.name.as_str())).cloned().collect();
    let input_name = cfg.backbone.input_name.clone();
    let mut g = GraphProto {
        name: format!("automm_{}", kind.name()),
        node: nodes,
        initializer,
        input: vec![value_info(&input_name, DataType::Float, &[None, Some(3), Some(s), Some(s)])],
        ..Default::default()
    };
    head_nodes(&mut g, head, &feature)?;
    let mut graph_input = input_name.clone();
    if kind == ExportKind::WithPreprocessing {
        // images uint8 [N,S,S,3] -> float -> x*scale+offset per channel -> NCHW, feeding the old input.
        graph_input = "images".into();
        if g.node.iter().any(|n| n.output.iter().any(|o| o == "images")) || input_name == "images" {
            return Err(Error::onnx("export", "the backbone already uses the name `images`"));
        }
        let aff = cfg.preprocess.normalization.affine();
        let scale =
            Tensor::from_vec(aff.iter().map(|a| a.0).collect::<Vec<f32>>(), (1, 1, 1, 3), &candle_core::Device::Cpu)?;
        let offset =
            Tensor::from_vec(aff.iter().map(|a| a.1).collect::<Vec<f32>>(), (1, 1, 1, 3), &candle_core::Device::Cpu)?;
        g.initializer.push(f32_to_proto("automm_pre_scale", &scale)?);
        g.initializer.push(f32_to_proto("automm_pre_offset", &offset)?);
        let pre = vec![
            node(
                "Cast",
                "automm_pre_cast",
                &["images"],
                &["automm_pre_f32"],
                vec![attr_int("to", DataType::Float as i64)],
            ),
            node("Mul", "automm_pre_scale", &["automm_pre_f32", "automm_pre_scale"], &["automm_pre_scaled"], vec![]),
            node("Add", "automm_pre_offset", &["automm_pre_scaled", "automm_pre_offset"], &["automm_pre_norm"], vec![]),
            node(
                "Transpose",
                "automm_pre_nchw",
                &["automm_pre_norm"],
                &[&input_name],
                vec![attr_ints("perm", &[0, 3, 1, 2])],
            ),
        ];
        g.node.splice(0..0, pre);
        g.input = vec![value_info("images", DataType::Uint8, &[None, Some(s), Some(s), Some(3)])];
    }
    let mut m = model_proto(g, opset, metadata(cfg, kind, &graph_input)?);
    m.producer_name = "automm".into();
    // Keep other domains the backbone imports (e.g. com.microsoft), relabel the default one.
    for o in &src.opset_import {
        if !(o.domain.is_empty() || o.domain == "ai.onnx") {
            m.opset_import.push(o.clone());
        }
    }
    m.ir_version = src.ir_version.max(8);
    Ok(m)
}

fn model_proto(graph: GraphProto, opset: i64, meta: Vec<StringStringEntryProto>) -> ModelProto {
    ModelProto {
        // IR 8 is read by ONNX Runtime 1.10+ and every current edge runtime.
        ir_version: 8,
        producer_name: "automm".into(),
        producer_version: VERSION.into(),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: opset }],
        graph: Some(graph),
        metadata_props: meta,
        ..Default::default()
    }
}

/// Options of [`export`].
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// What to write.
    pub kind: ExportKind,
    /// Opset to declare (default: the backbone's; 17 for head-only).
    pub opset: Option<i64>,
    /// Check the written file against the model folder before moving it into place.
    pub verify: bool,
    /// Rows of the table used for verification (default: the training table).
    pub verify_data: Option<PathBuf>,
    /// How many images verification uses.
    pub verify_images: usize,
    /// A post-hoc prior correction baked into the head's bias (recorded as `automm.prior_correction`).
    pub prior: Option<crate::model::prior::PriorCorrection>,
    /// Where the backbone is now, when it moved since training (its sha256 is checked).
    pub backbone: Option<PathBuf>,
}

impl ExportOptions {
    /// A merged export, unverified, without prior correction (set fields with `..ExportOptions::merged()`).
    pub fn merged() -> ExportOptions {
        ExportOptions {
            kind: ExportKind::Merged,
            opset: None,
            verify: false,
            verify_data: None,
            verify_images: 0,
            prior: None,
            backbone: None,
        }
    }
}

/// What [`export`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The written file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Verification result, when asked for.
    pub verification: Option<crate::deploy::verify::Verification>,
}

/// Exports the model folder `model` to `output` as `opts` say; atomic, and verified before it lands.
pub fn export(model: &Path, output: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    let md = ModelDir::new(model);
    let cfg = match opts.kind {
        ExportKind::HeadOnly => md.read_config()?,
        _ => md.read_config_with_backbone(opts.backbone.as_deref())?,
    };
    let mut head = Head::load(&md.head(), cfg.classes.len(), cfg.backbone.feature_dim, &candle_core::Device::Cpu)?;
    if let Some(c) = &opts.prior {
        head = head.shifted(&c.shift(&cfg.classes, &cfg.class_counts)?)?;
    }
    let update = md.read_backbone_update(&cfg, &candle_core::Device::Cpu)?;
    let mut proto = build(&cfg, &head, &update, opts.kind, opts.opset)?;
    if let Some(c) = &opts.prior {
        let value = serde_json::to_string(c).map_err(|e| Error::encode("export metadata", e))?;
        proto.metadata_props.push(StringStringEntryProto { key: keys::PRIOR_CORRECTION.into(), value });
    }
    // Temp files of exports killed before their rename (an hour old: no export takes that long to verify).
    let swept = crate::util::fs::sweep_stale_temps(output, std::time::Duration::from_secs(3600));
    if swept > 0 {
        tracing::info!("removed {swept} temp file(s) left by interrupted exports next to {}", output.display());
    }
    let staged = stage_atomic(output, &proto.encode_to_vec())?;
    let verification = if opts.verify {
        let v = crate::deploy::verify::verify(
            model,
            staged.temp_path(),
            opts.verify_data.as_deref(),
            opts.verify_images,
            opts.prior.as_ref(),
            opts.backbone.as_deref(),
        )?;
        if !v.passed {
            return Err(Error::Model {
                path: output.to_path_buf(),
                msg: format!("verification failed: max |probability difference| {:.3e} > {:.0e} on {} images ({}); nothing was written", v.max_abs_diff, v.tolerance, v.images, v.engine),
            });
        }
        Some(v)
    } else {
        None
    };
    staged.commit()?;
    let bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    Ok(ExportReport { path: output.to_path_buf(), bytes, verification })
}
