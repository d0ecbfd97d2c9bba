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

/// One compared output.
#[derive(Debug, Clone, Serialize)]
pub struct OutputDiff {
    /// The tensor.
    pub name: String,
    /// Its shape (ORT's; a different candle shape fails the comparison).
    pub shape: Vec<usize>,
    /// max |candle - ORT|.
    pub max_abs_diff: f32,
    /// `max_abs_diff` relative to the output's scale (max |ORT|), what the tolerance applies to.
    pub max_rel_diff: f32,
    /// NaN/Inf values in either engine's output (any fails the comparison).
    pub non_finite: usize,
    /// Shapes equal, every value finite and `max_rel_diff` within the tolerance.
    pub passed: bool,
}

/// Result of [`compare`].
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The model.
    pub model: PathBuf,
    /// Input shape.
    pub input_shape: Vec<usize>,
    /// Every compared output, in graph order.
    pub outputs: Vec<OutputDiff>,
    /// The largest `max_abs_diff` over the outputs.
    pub max_abs_diff: f32,
    /// The relative tolerance applied.
    pub tolerance: f32,
    /// Every output passed.
    pub passed: bool,
    /// Timings, candle first.
    pub timings: Vec<EngineTiming>,
}

/// Compares one output of the two engines.
fn diff(name: &str, ours: &Tensor, theirs: (&[usize], &[f32]), tolerance: f32) -> Result<OutputDiff> {
    let (shape, want) = theirs;
    let got: Vec<f32> = ours.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    let same_shape = ours.dims() == shape;
    let non_finite = got.iter().chain(want).filter(|v| !v.is_finite()).count();
    let max_abs_diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, |m, d| {
        if d.is_nan() || m.is_nan() {
            f32::NAN
        } else {
            m.max(d)
        }
    });
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max).max(f32::MIN_POSITIVE);
    let max_rel_diff = max_abs_diff / scale;
    let passed = same_shape && non_finite == 0 && max_rel_diff <= tolerance;
    Ok(OutputDiff { name: name.to_string(), shape: shape.to_vec(), max_abs_diff, max_rel_diff, non_finite, passed })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Writes a copy of `model` whose outputs are exactly `tensor`, so ORT can return an intermediate value.
pub fn with_output(model: &Path, tensor: &str, dir: &Path) -> Result<PathBuf> {
    with_outputs(model, &[tensor.to_string()], dir)
}

/// Writes a copy of `model` whose outputs are exactly `tensors`, in that order.
pub fn with_outputs(model: &Path, tensors: &[String], dir: &Path) -> Result<PathBuf> {
    let mut m = read_model(model)?;
    let g = m.graph.as_mut().ok_or_else(|| Error::onnx(model.display().to_string(), "no graph"))?;
    if g.output.iter().map(|o| &o.name).ne(tensors.iter()) {
        g.output = tensors.iter().map(|t| ValueInfoProto { name: t.clone(), ..Default::default() }).collect();
    }
    let out = dir.join("model_with_output.onnx");
    crate::util::fs::write_atomic(&out, &m.encode_to_vec())?;
    Ok(out)
}

/// Untimed running at the start of each engine's block (milliseconds).
const WARM_MS: u128 = 200;

/// Runs `model` on `input` with candle and ORT (two rounds of warm-up then `runs` timed runs per engine;
/// medians) and compares `tensor`, or every graph output when None: shapes, NaN/Inf, and the largest
/// difference relative to each output's scale against `tolerance`.
pub fn compare(
    model: &Path,
    input: &Tensor,
    tensor: Option<&str>,
    runs: usize,
    threads: usize,
    tolerance: f32,
) -> Result<Comparison> {
    let proto = read_model(model)?;
    let what = model.display().to_string();
    let names: Vec<String> = match tensor {
        Some(t) => vec![t.to_string()],
        None => proto.graph.as_ref().map(|g| g.output.iter().map(|o| o.name.clone()).collect()).unwrap_or_default(),
    };
    if names.is_empty() {
        return Err(Error::onnx(what, "no outputs"));
    }
    let graph = Graph::from_model(&proto, &what, &Device::Cpu, Some(names.clone()))?;
    let in_name = graph.inputs().first().ok_or_else(|| Error::onnx(&what, "no inputs"))?.name.clone();
    let feeds = [(in_name.as_str(), input.clone())];
    // Plans (and starts the thread pool) before ORT's library is loaded.
    graph.run(&feeds)?;
    let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let sess = ort::OrtSession::open(&with_outputs(model, &names, tmp.path())?, threads)?;
    let data: Vec<f32> = input.flatten_all()?.to_vec1()?;
    let ort_feeds = [(in_name.as_str(), input.dims(), data.as_slice())];
    let (ours, theirs, timings) = timed_runs(&graph, &feeds, &sess, &ort_feeds, runs, input.dims())?;
    if theirs.len() != ours.len() {
        return Err(Error::Runtime(format!("ORT returned {} float outputs for {} tensors", theirs.len(), ours.len())));
    }
    let outputs = names
        .iter()
        .zip(ours.iter().zip(&theirs))
        .map(|(n, (o, (shape, v)))| diff(n, o, (shape, v), tolerance))
        .collect::<Result<Vec<_>>>()?;
    let max_abs_diff =
        outputs
            .iter()
            .map(|o| o.max_abs_diff)
            .fold(0f32, |m, d| if d.is_nan() || m.is_nan() { f32::NAN } else { m.max(d) });
    let passed = outputs.iter().all(|o| o.passed);
    Ok(Comparison {
        model: model.to_path_buf(),
        input_shape: input.dims().to_vec(),
        outputs,
        max_abs_diff,
        tolerance,
        passed,
        timings,
    })
}

/// Output of both engines' last runs and their timings.
type Runs = (Vec<Tensor>, Vec<(Vec<usize>, Vec<f32>)>, Vec<EngineTiming>);

/// Two rounds of (candle block, ORT block), so drift on a shared machine hits both engines. Each block
/// starts with untimed runs lasting at least WARM_MS: ORT's pool threads keep spinning for tens of
/// milliseconds after its last run and would slow the candle runs right after it.
fn timed_runs(
    graph: &Graph,
    feeds: &[(&str, Tensor)],
    sess: &ort::OrtSession,
    ort_feeds: &[(&str, &[usize], &[f32])],
    runs: usize,
    dims: &[usize],
) -> Result<Runs> {
    let n = dims.first().copied().unwrap_or(1).max(1) as f64;
    let (mut candle_times, mut ort_times) = (Vec::new(), Vec::new());
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let t0 = Instant::now();
        while t0.elapsed().as_millis() < WARM_MS {
            graph.run(feeds)?;
        }
        for _ in 0..runs.max(1) {
            let t0 = Instant::now();
            ours = graph.run(feeds)?;
            candle_times.push(t0.elapsed().as_secs_f64() * 1000.0 / n);
        }
        let t0 = Instant::now();
        while t0.elapsed().as_millis() < WARM_MS {
            sess.run_f32(ort_feeds)?;
        }
        for _ in 0..runs.max(1) {
            let t0 = Instant::now();
            theirs = sess.run_f32(ort_feeds)?;
            ort_times.push(t0.elapsed().as_secs_f64() * 1000.0 / n);
        }
    }
    let timings = vec![
        EngineTiming { engine: EngineKind::Candle, ms_per_image: median(candle_times) },
        EngineTiming { engine: EngineKind::Ort, ms_per_image: median(ort_times) },
    ];
    Ok((ours, theirs, timings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_is_relative_to_the_output_scale_and_fails_on_nan_or_shape() {
        let t = |v: Vec<f32>, d: &[usize]| Tensor::from_vec(v, d, &Device::Cpu).unwrap();
        let d = diff("y", &t(vec![100.0, -50.0], &[2]), (&[2], &[100.02, -50.0]), 1e-3).unwrap();
        assert!(d.passed && (d.max_rel_diff - 2e-4).abs() < 1e-6, "{d:?}");
        let d = diff("y", &t(vec![f32::NAN, 1.0], &[2]), (&[2], &[0.0, 1.0]), 1e-3).unwrap();
        assert!(!d.passed && d.non_finite == 1 && d.max_abs_diff.is_nan(), "{d:?}");
        let d = diff("y", &t(vec![1.0, 1.0], &[1, 2]), (&[2], &[1.0, 1.0]), 1e-3).unwrap();
        assert!(!d.passed, "a shape difference must fail: {d:?}");
    }
}
