//! Inference engines over the same ONNX files: our candle importer ([`crate::onnx`]) and ONNX Runtime
//! through `ort` with `load-dynamic` ([`ort`]), which finds the runtime library at run time; and a
//! side-by-side comparison of the two (max abs diff, ms per image).

pub mod exported;
pub mod ort;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_onnx::onnx::ValueInfoProto;
use prost::Message;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::onnx::{read_model, Graph};

crate::named_enum! {
    /// Which engine runs a model.
    pub enum EngineKind("engine") {
        /// Our importer on candle.
        Candle = "candle",
        /// ONNX Runtime.
        Ort = "ort" | "onnxruntime",
    }
}

/// One engine's figures in a comparison.
#[derive(Debug, Clone, Serialize)]
pub struct EngineTiming {
    /// The engine.
    pub engine: EngineKind,
    /// Median milliseconds per image over the timed runs.
    pub ms_per_image: f64,
}

/// Result of [`compare`].
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The model.
    pub model: PathBuf,
    /// The compared tensor.
    pub tensor: String,
    /// Input shape.
    pub input_shape: Vec<usize>,
    /// Output shape.
    pub output_shape: Vec<usize>,
    /// max |candle - ORT|.
    pub max_abs_diff: f32,
    /// Timings, candle first.
    pub timings: Vec<EngineTiming>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Writes a copy of `model` whose outputs are exactly `tensor`, so ORT can return an intermediate value.
pub fn with_output(model: &Path, tensor: &str, dir: &Path) -> Result<PathBuf> {
    let mut m = read_model(model)?;
    let g = m.graph.as_mut().ok_or_else(|| Error::onnx(model.display().to_string(), "no graph"))?;
    if !(g.output.len() == 1 && g.output[0].name == tensor) {
        g.output = vec![ValueInfoProto { name: tensor.to_string(), ..Default::default() }];
    }
    let out = dir.join("model_with_output.onnx");
    crate::util::fs::write_atomic(&out, &m.encode_to_vec())?;
    Ok(out)
}

/// Untimed running at the start of each engine's block (milliseconds).
const WARM_MS: u128 = 200;

/// Runs `model` on `input` with candle and ORT (two rounds of warm-up then `runs` timed runs per engine;
/// medians) and compares
/// `tensor` (default: the first graph output).
pub fn compare(model: &Path, input: &Tensor, tensor: Option<&str>, runs: usize, threads: usize) -> Result<Comparison> {
    let proto = read_model(model)?;
    let tensor = match tensor {
        Some(t) => t.to_string(),
        None => proto
            .graph
            .as_ref()
            .and_then(|g| g.output.first())
            .map(|o| o.name.clone())
            .ok_or_else(|| Error::onnx(model.display().to_string(), "no outputs"))?,
    };
    let graph = Graph::from_model(&proto, &model.display().to_string(), &Device::Cpu, Some(vec![tensor.clone()]))?;
    let in_name =
        graph.inputs().first().ok_or_else(|| Error::onnx(model.display().to_string(), "no inputs"))?.name.clone();
    let n = input.dims().first().copied().unwrap_or(1).max(1) as f64;
    let feeds = [(in_name.as_str(), input.clone())];
    // Plans (and starts the thread pool) before ORT's library is loaded.
    graph.run(&feeds)?;
    let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let ort_model = with_output(model, &tensor, tmp.path())?;
    let sess = ort::OrtSession::open(&ort_model, threads)?;
    let data: Vec<f32> = input.flatten_all()?.to_vec1()?;
    let ort_feeds = [(in_name.as_str(), input.dims(), data.as_slice())];
    // Two rounds of (candle block, ORT block), so drift on a shared machine hits both engines. Each block
    // starts with untimed runs lasting at least WARM_MS: ORT's pool threads keep spinning for tens of
    // milliseconds after its last run and would slow the candle runs right after it.
    let (mut candle_times, mut ort_times) = (Vec::new(), Vec::new());
    let (mut y, mut ort_out) = (None, None);
    for _ in 0..2 {
        let t0 = Instant::now();
        while t0.elapsed().as_millis() < WARM_MS {
            graph.run(&feeds)?;
        }
        for _ in 0..runs.max(1) {
            let t0 = Instant::now();
            y = Some(graph.run(&feeds)?.remove(0));
            candle_times.push(t0.elapsed().as_secs_f64() * 1000.0 / n);
        }
        let t0 = Instant::now();
        while t0.elapsed().as_millis() < WARM_MS {
            sess.run_f32(&ort_feeds)?;
        }
        for _ in 0..runs.max(1) {
            let t0 = Instant::now();
            ort_out = sess.run_f32(&ort_feeds)?.into_iter().next();
            ort_times.push(t0.elapsed().as_secs_f64() * 1000.0 / n);
        }
    }
    let y = y.ok_or_else(|| Error::Runtime("no run".into()))?;
    let (oshape, odata) = ort_out.ok_or_else(|| Error::Runtime("ORT returned no output".into()))?;
    let (candle_ms, ort_ms) = (median(candle_times), median(ort_times));
    let yv: Vec<f32> = y.flatten_all()?.to_vec1()?;
    if y.dims() != oshape.as_slice() {
        return Err(Error::Shape { name: tensor, msg: format!("candle gives {:?}, ORT gives {oshape:?}", y.dims()) });
    }
    let max_abs_diff = yv.iter().zip(&odata).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    Ok(Comparison {
        model: model.to_path_buf(),
        tensor,
        input_shape: input.dims().to_vec(),
        output_shape: oshape,
        max_abs_diff,
        timings: vec![
            EngineTiming { engine: EngineKind::Candle, ms_per_image: candle_ms },
            EngineTiming { engine: EngineKind::Ort, ms_per_image: ort_ms },
        ],
    })
}
