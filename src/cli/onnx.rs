//! `automm onnx`: run, compare and differentiate ONNX models on our candle engine.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use automm::deploy::engine::EngineKind;

#[derive(Subcommand, Debug)]
pub enum OnnxCommand {
    /// Run a model on an .npy input and write the first output as .npy.
    Run {
        /// The ONNX model.
        model: PathBuf,
        /// Input arrays (.npy): `NAME=FILE` per graph input (repeatable), or a bare `FILE` for the first
        /// input. Dtypes are kept (float32, float64, int64, uint8, ...); ONNX Runtime takes float32, uint8, int64.
        #[arg(long, required = true)]
        input: Vec<String>,
        /// Output array (.npy).
        #[arg(long)]
        output: PathBuf,
        /// Tensor to read (default: the graph's first output).
        #[arg(long)]
        tensor: Option<String>,
        /// Engine.
        #[arg(long, value_enum, default_value = "candle")]
        engine: EngineKind,
    },
    /// Compare candle and ONNX Runtime on one model: max abs diff and ms per image.
    Compare {
        /// The ONNX model.
        model: PathBuf,
        /// Input array (.npy); otherwise a seeded random batch.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Batch size of the random input.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Tensor to compare (default: every graph output; `features` = the detected feature tensor).
        #[arg(long)]
        tensor: Option<String>,
        /// Largest difference relative to an output's scale (max |ORT|) that passes; above it, or on any
        /// NaN/Inf or shape difference, the command exits non-zero.
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f32,
        /// Timed runs per engine (after one warm-up).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// ORT intra-op threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Also print where candle's time goes, per op type.
        #[arg(long)]
        profile: bool,
    },
    /// Gradients of sum(features * weights) w.r.t. the initializers fine-tuning would train, as .npz
    /// (one array per initializer): to compare with PyTorch (models/check_finetune_grads.py).
    Grads {
        /// The ONNX model.
        model: PathBuf,
        /// Input batch (.npy, float32).
        #[arg(long)]
        input: PathBuf,
        /// Weights of the features (.npy, same shape as the features).
        #[arg(long)]
        weights: PathBuf,
        /// `bit_fit`, `norm_fit` or `full` (every parameter, as `model.backbone.freeze=false`).
        #[arg(long, default_value = "norm_fit")]
        finetune: String,
        /// Initializer-name prefixes that train too.
        #[arg(long, value_delimiter = ',')]
        layers: Vec<String>,
        /// Feature tensor (default: the detected one).
        #[arg(long)]
        tensor: Option<String>,
        /// Output .npz.
        #[arg(long)]
        output: PathBuf,
    },
}

/// Runs one `onnx` subcommand.
pub fn run(c: OnnxCommand) -> Result<()> {
    match c {
        OnnxCommand::Run { model, input, output, tensor, engine } => onnx_run(&model, &input, &output, tensor, engine),
        OnnxCommand::Grads { model, input, weights, finetune, layers, tensor, output } => {
            grads(model, input, weights, finetune, layers, tensor, output)
        }
        OnnxCommand::Compare { model, input, batch, tensor, tolerance, runs, threads, json, profile } => {
            compare(model, input, batch, tensor, tolerance, runs, threads, json, profile)
        }
    }
}

fn grads(
    model: PathBuf,
    input: PathBuf,
    weights: PathBuf,
    finetune: String,
    layers: Vec<String>,
    tensor: Option<String>,
    output: PathBuf,
) -> Result<()> {
    let mut hp = automm::model::hparams::HyperParams { trainable_layers: layers, ..Default::default() };
    match finetune.as_str() {
        "full" => hp.freeze = false,
        m => hp.efficient_finetune = m.parse().map_err(|e| anyhow::anyhow!("--finetune: {e} (or `full`)"))?,
    }
    let x = automm::onnx::read_npy(&input)?;
    let r = automm::onnx::read_npy(&weights)?;
    let t0 = std::time::Instant::now();
    let out = automm::train::finetune::feature_gradients(&model, &x, &r, &hp, tensor)?;
    candle_core::Tensor::write_npz(&out.iter().map(|(n, t)| (n.as_str(), t)).collect::<Vec<_>>(), &output)?;
    println!(
        "{} initializers, forward+backward {:.1}s, wrote {}",
        out.len(),
        t0.elapsed().as_secs_f64(),
        output.display()
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn compare(
    model: PathBuf,
    input: Option<PathBuf>,
    batch: usize,
    tensor: Option<String>,
    tolerance: f32,
    runs: usize,
    threads: usize,
    json: bool,
    profile: bool,
) -> Result<()> {
    let x = match &input {
        Some(p) => automm::onnx::read_npy(p)?,
        None => random_input(&model, batch)?,
    };
    let tensor = match tensor.as_deref() {
        Some("features") => Some(automm::onnx::detect_feature_tensor(&automm::onnx::read_model(&model)?)?),
        other => other.map(str::to_string),
    };
    let c = automm::deploy::engine::compare(&model, &x, tensor.as_deref(), runs, threads, tolerance)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        println!(
            "model {}  input {:?}  tolerance {:.0e} (relative to each output's max |ORT|)",
            c.model.display(),
            c.input_shape,
            c.tolerance
        );
        for o in &c.outputs {
            println!(
                "{:<4} `{}` {:?}: max |candle - ort| = {:.3e} ({:.3e} relative), {} NaN/Inf",
                if o.passed { "ok" } else { "FAIL" },
                o.name,
                o.shape,
                o.max_abs_diff,
                o.max_rel_diff,
                o.non_finite
            );
        }
        let ort_ms = c.timings[1].ms_per_image;
        for t in &c.timings {
            println!("{:<7} {:>9.2} ms/img  ({:.2}x ORT)", t.engine, t.ms_per_image, t.ms_per_image / ort_ms);
        }
    }
    if profile {
        let g = automm::onnx::Graph::load(&model, &candle_core::Device::Cpu, tensor.clone().map(|t| vec![t]))?;
        let name = g.inputs().first().map(|i| i.name.clone()).unwrap_or_default();
        let feeds = [(name.as_str(), x.clone())];
        // Untimed runs first: ORT's pool threads spin for a while after its last run and would slow the
        // first steps profiled.
        let t0 = std::time::Instant::now();
        while t0.elapsed().as_millis() < 300 {
            g.run(&feeds)?;
        }
        let times = g.profile(&feeds)?;
        let st = g.plan_stats(&feeds)?;
        println!(
            "plan: {} nodes -> {} steps per run ({} fused, {} with GELU inside a MatMul, {} channel-blocked)",
            st.nodes, st.steps, st.fused, st.matmul_gelu, st.blocked
        );
        let total: f64 = times.iter().map(|t| t.seconds).sum();
        println!("{:<22} {:>6} {:>10} {:>7}", "op", "nodes", "ms", "share");
        for t in &times {
            println!(
                "{:<22} {:>6} {:>10.2} {:>6.1}%",
                t.op,
                t.count,
                t.seconds * 1e3,
                100.0 * t.seconds / total.max(1e-12)
            );
        }
    }
    if !c.passed {
        anyhow::bail!(
            "the engines differ beyond --tolerance {tolerance:.0e} (or in shape, or with NaN/Inf): see above"
        );
    }
    Ok(())
}

/// A seeded standard-normal batch shaped for the model's first input (symbolic dims: batch, else 224).
fn random_input(model: &std::path::Path, batch: usize) -> Result<candle_core::Tensor> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let m = automm::onnx::read_model(model)?;
    let g = m.graph.as_ref().context("no graph")?;
    let inits: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let input = g.input.iter().find(|i| !inits.contains(i.name.as_str())).context("the model has no inputs")?;
    let dims: Vec<usize> = automm::onnx::value_dims(input)
        .iter()
        .enumerate()
        .map(|(i, d)| d.unwrap_or(if i == 0 { batch } else { 224 }))
        .collect();
    let n: usize = dims.iter().product();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let normal = rand_distr::StandardNormal;
    let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
    Ok(candle_core::Tensor::from_vec(v, dims, &candle_core::Device::Cpu)?)
}

/// `(input name or None for the first input, array)` of each `--input`.
fn read_inputs(specs: &[String]) -> Result<Vec<(Option<String>, candle_core::Tensor)>> {
    specs
        .iter()
        .map(|spec| {
            let (name, file) = match spec.split_once('=') {
                Some((n, f)) if !n.is_empty() => (Some(n.to_string()), f),
                _ => (None, spec.as_str()),
            };
            let t = candle_core::Tensor::read_npy(file)
                .with_context(|| format!("--input {spec}: not a readable .npy array"))?;
            Ok((name, t))
        })
        .collect()
}

fn onnx_run(
    model: &std::path::Path,
    inputs: &[String],
    output: &std::path::Path,
    tensor: Option<String>,
    engine: EngineKind,
) -> Result<()> {
    let xs = read_inputs(inputs)?;
    let y = match engine {
        EngineKind::Candle => {
            let g = automm::onnx::Graph::load(model, &candle_core::Device::Cpu, tensor.map(|t| vec![t]))?;
            let names: Vec<String> = g.inputs().iter().map(|i| i.name.clone()).collect();
            let feeds = name_feeds(&names, xs)?;
            let feeds: Vec<(&str, candle_core::Tensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
            g.run(&feeds)?.into_iter().next().context("no output")?
        }
        EngineKind::Ort => {
            let tmp = tempfile::tempdir()?;
            let path = match &tensor {
                Some(t) => automm::deploy::engine::with_output(model, t, tmp.path())?,
                None => model.to_path_buf(),
            };
            let s = automm::deploy::engine::ort::OrtSession::open(&path, 0)?;
            let mut feeds = Vec::new();
            for (name, x) in name_feeds(&s.inputs, xs)? {
                let dims = x.dims().to_vec();
                let feed = match x.dtype() {
                    candle_core::DType::F32 => {
                        automm::deploy::engine::ort::Feed::F32(dims, x.flatten_all()?.to_vec1()?)
                    }
                    candle_core::DType::U8 => automm::deploy::engine::ort::Feed::U8(dims, x.flatten_all()?.to_vec1()?),
                    candle_core::DType::I64 => {
                        automm::deploy::engine::ort::Feed::I64(dims, x.flatten_all()?.to_vec1()?)
                    }
                    other => anyhow::bail!(
                        "--input {name}: {other:?} arrays are not fed to ONNX Runtime here (float32, uint8, int64)"
                    ),
                };
                feeds.push((name, feed));
            }
            let feeds: Vec<(&str, _)> = feeds.iter().map(|(n, f)| (n.as_str(), f.clone())).collect();
            let (shape, v) = s.run(feeds)?.into_iter().next().context("no output")?;
            candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?
        }
    };
    let tmp = output.with_extension("npy.tmp");
    y.write_npy(&tmp)?;
    std::fs::rename(&tmp, output)?;
    println!("wrote {} {:?}", output.display(), y.dims());
    Ok(())
}

/// Matches `--input` arrays to the graph's inputs: named ones by name, a bare one to the first input;
/// every graph input must be given once.
fn name_feeds(
    names: &[String],
    xs: Vec<(Option<String>, candle_core::Tensor)>,
) -> Result<Vec<(String, candle_core::Tensor)>> {
    let mut out: Vec<(String, candle_core::Tensor)> = Vec::new();
    for (name, t) in xs {
        let name = match name {
            Some(n) if names.contains(&n) => n,
            Some(n) => anyhow::bail!("--input {n}=...: the model has no input `{n}` (its inputs: {names:?})"),
            None => names.first().cloned().context("the model has no inputs")?,
        };
        if out.iter().any(|(n, _)| *n == name) {
            anyhow::bail!("input `{name}` is given twice");
        }
        out.push((name, t));
    }
    if let Some(missing) = names.iter().find(|n| !out.iter().any(|(o, _)| o == *n)) {
        anyhow::bail!("the model's input `{missing}` has no --input {missing}=FILE.npy");
    }
    Ok(out)
}
