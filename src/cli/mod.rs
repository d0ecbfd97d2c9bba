//! Command-line interface: clap commands mapped onto library calls. Printing lives here; the work lives
//! in the library.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use automm::data::{Normalization, Table};
use automm::deploy::engine::exported::ExportedModel;
use automm::deploy::engine::EngineKind;
use automm::deploy::export::ExportOptions;
use automm::deploy::meta::ExportKind;
use automm::deploy::predict::{write_predictions, Predictor};
use automm::model::metrics;
use automm::train::config::HyperParamsBuilder;
use automm::train::{resume, train, Event, ResumeOptions, TrainRequest};
use automm::util::device::select_device;

/// automm: train and deploy image classifiers on imbalanced data.
#[derive(Parser, Debug)]
#[command(name = "automm", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More logging (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a classifier head on a frozen ONNX backbone.
    Train(TrainArgs),
    /// Score a trained model on a labelled table.
    Evaluate(EvaluateArgs),
    /// Predict labels and class probabilities for a table.
    Predict(PredictArgs),
    /// Run or compare ONNX models on the candle engine.
    #[command(subcommand)]
    Onnx(OnnxCommand),
    /// Write a trained model to ONNX: backbone + head (default), head only, or with preprocessing inside.
    Export(ExportArgs),
    /// Show what automm finds on this machine: ONNX Runtime, CUDA, threads.
    Doctor,
    /// Serve a model over gRPC with dynamic batching.
    Serve(ServeArgs),
    /// The whole product in one offline command: generated imbalanced data, cross-entropy vs focal loss,
    /// export with verification, gRPC serving and client predictions.
    Demo(DemoArgs),
    /// Call an automm server.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Benchmarks that print a table (ratios against a baseline measured in the same run).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training table (CSV or Parquet) with an image-path column and a label column.
    #[arg(long, required_unless_present = "resume")]
    pub train_data: Option<PathBuf>,
    /// Label column.
    #[arg(long, required_unless_present = "resume")]
    pub label: Option<String>,
    /// Image-path column (found automatically when omitted).
    #[arg(long)]
    pub image_column: Option<String>,
    /// Validation table; without it a stratified holdout of the training table is used.
    #[arg(long)]
    pub tuning_data: Option<PathBuf>,
    /// Backbone ONNX file.
    #[arg(long, required_unless_present = "resume")]
    pub backbone: Option<PathBuf>,
    /// Tensor read as features (default: input of the final classifier, or the graph output).
    #[arg(long)]
    pub feature_tensor: Option<String>,
    /// Pixel normalisation: imagenet (default), symmetric (x/255*2-1, EfficientNet-Lite) or mean_std:R,G,B:R,G,B.
    #[arg(long, default_value = "imagenet")]
    pub normalization: String,
    /// Output model folder.
    #[arg(long, required_unless_present = "resume")]
    pub output: Option<PathBuf>,
    /// Continue the interrupted run in this model folder from its last checkpoint (everything else comes
    /// from the folder; `--hp` may change settings, e.g. a lower learning rate after a divergence).
    #[arg(long, conflicts_with_all = ["train_data", "label", "image_column", "tuning_data", "backbone", "feature_tensor", "output"])]
    pub resume: Option<PathBuf>,
    /// Hyperparameters file (YAML or JSON), AutoMM key names.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Hyperparameter override KEY=VALUE (repeatable), e.g. optimization.focal_loss.gamma=1.0.
    #[arg(long = "hp")]
    pub hp: Vec<String>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// Model folder written by `automm train`.
    #[arg(long)]
    pub model: PathBuf,
    /// Labelled table.
    #[arg(long)]
    pub data: PathBuf,
    /// Comma-separated metric names (AutoGluon's).
    #[arg(long, default_value = "accuracy,balanced_accuracy,f1_macro")]
    pub metrics: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Model folder written by `automm train`, or an `.onnx` written by `automm export`.
    #[arg(long)]
    pub model: PathBuf,
    /// Engine: candle (default for a model folder) or ort (default for an .onnx when ONNX Runtime is found).
    #[arg(long, value_enum)]
    pub engine: Option<EngineKind>,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// ORT intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Table of images.
    #[arg(long)]
    pub data: PathBuf,
    /// Output CSV.
    #[arg(long)]
    pub output: PathBuf,
    /// Like env.num_gpus: non-zero asks ONNX Runtime for its CUDA execution provider.
    #[arg(long, default_value_t = 0)]
    pub num_gpus: i64,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Model folder written by `automm train`.
    #[arg(long)]
    pub model: PathBuf,
    /// Output .onnx file.
    #[arg(long)]
    pub output: PathBuf,
    /// Write the head alone (input `features` [N, D]).
    #[arg(long, conflicts_with = "with_preprocessing")]
    pub head_only: bool,
    /// Take uint8 images [N, H, W, 3] at the model's input size and preprocess inside the graph.
    #[arg(long)]
    pub with_preprocessing: bool,
    /// Opset to declare (default: the backbone's).
    #[arg(long)]
    pub opset: Option<i64>,
    /// Run the export on a few training images and fail if probabilities differ by more than 1e-4.
    #[arg(long)]
    pub verify: bool,
    /// Table of images for --verify (default: the training table).
    #[arg(long)]
    pub verify_data: Option<PathBuf>,
    /// Images used by --verify.
    #[arg(long, default_value_t = 8)]
    pub verify_images: usize,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// An exported merged .onnx (`automm export`), or a model folder (exported on start).
    #[arg(long)]
    pub model: PathBuf,
    /// gRPC address (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: std::net::SocketAddr,
    /// Most items per executed batch.
    #[arg(long, default_value_t = 32)]
    pub max_batch_size: usize,
    /// Longest wait of the oldest queued request for a fuller batch, microseconds.
    #[arg(long, default_value_t = 2000)]
    pub max_queue_delay_us: u64,
    /// Most queued requests; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024)]
    pub max_queue_size: usize,
    /// Largest request message, bytes (bigger -> RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 64 << 20)]
    pub max_request_bytes: usize,
    /// Prometheus metrics address (GET /metrics).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// TLS certificate (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// File holding the bearer token clients must send.
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    /// Engine: ort (default when ONNX Runtime is found) or candle.
    #[arg(long, value_enum)]
    pub engine: Option<EngineKind>,
    /// ORT intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Like env.num_gpus: non-zero asks ONNX Runtime for its CUDA execution provider (builds with
    /// --features cuda; falls back to the CPU, logged once).
    #[arg(long, default_value_t = 0)]
    pub num_gpus: i64,
    /// Folder Fit may read tables and images from (Fit is off without it).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Backbone ONNX that Fit trains on (Fit is off without it).
    #[arg(long)]
    pub backbone: Option<PathBuf>,
    /// Folder for Fit runs and exports.
    #[arg(long, default_value = "runs/serve")]
    pub work_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Backbone ONNX (default: models/efficientnet_lite0.onnx when made, else the committed Swin fixture).
    #[arg(long)]
    pub backbone: Option<PathBuf>,
    /// Normalisation (default: symmetric for EfficientNet-Lite files, else imagenet).
    #[arg(long)]
    pub normalization: Option<String>,
    /// Your own table instead of generated data (split 80/20 into train and test).
    #[arg(long, requires = "label")]
    pub data: Option<PathBuf>,
    /// Label column of --data.
    #[arg(long)]
    pub label: Option<String>,
    /// Work folder.
    #[arg(long, default_value = "runs/demo")]
    pub work_dir: PathBuf,
    /// Epochs per training run.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Server URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// File holding the bearer token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for https:// servers.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Predict a table of images through the server and write a CSV like `automm predict`.
    Predict {
        #[command(flatten)]
        server: ServerArgs,
        /// Table of images.
        #[arg(long)]
        data: PathBuf,
        /// Output CSV.
        #[arg(long)]
        output: PathBuf,
        /// Images per request.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
    },
    /// Train on the server (paths relative to its --data-root) and hot-swap the new model in.
    Fit {
        #[command(flatten)]
        server: ServerArgs,
        /// Training table, relative to the server's data root.
        #[arg(long)]
        train_data: String,
        /// Label column.
        #[arg(long)]
        label: String,
        /// Validation table, relative to the server's data root.
        #[arg(long)]
        tuning_data: Option<String>,
        /// Hyperparameter KEY=VALUE (repeatable).
        #[arg(long = "hp")]
        hp: Vec<String>,
    },
    /// Check the server's health.
    Health {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Describe the served model.
    Info {
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Server throughput and latency at several client counts vs a raw ORT session on the same model.
    Serve {
        /// Exported merged .onnx.
        #[arg(long)]
        model: PathBuf,
        /// Seconds per client count.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Client counts (comma-separated).
        #[arg(long, default_value = "1,8,32")]
        clients: String,
        /// A final soak at the highest client count, seconds (0 = none).
        #[arg(long, default_value_t = 0.0)]
        soak_seconds: f64,
        /// Server --max-batch-size.
        #[arg(long, default_value_t = 32)]
        max_batch_size: usize,
        /// Server --max-queue-delay-us.
        #[arg(long, default_value_t = 2000)]
        max_queue_delay_us: u64,
        /// Repeat the whole measurement this many times and print the median server/raw ratio per client
        /// count (single runs are noisy on small shared machines).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Run the server as a separate `automm serve` process (the load generator then does not share
        /// the server's process; on a small machine it still shares its cores).
        #[arg(long)]
        server_process: bool,
    },
    /// A mixed-load soak against a separate `automm serve` process: good images, bad images, tight
    /// deadlines and clients that leave mid-request; checks every status code, RSS, queue drain and a
    /// clean SIGTERM exit. Exits non-zero when anything unexpected happened.
    Soak {
        /// Exported merged .onnx.
        #[arg(long)]
        model: PathBuf,
        /// Concurrent clients.
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 600.0)]
        seconds: f64,
        /// Seconds between RSS samples.
        #[arg(long, default_value_t = 60.0)]
        sample_seconds: f64,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum OnnxCommand {
    /// Run a model on an .npy input and write the first output as .npy.
    Run {
        /// The ONNX model.
        model: PathBuf,
        /// Input array (.npy, float32).
        #[arg(long)]
        input: PathBuf,
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
        /// Tensor to compare (default: the graph's first output; `features` = the detected feature tensor).
        #[arg(long)]
        tensor: Option<String>,
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
        /// `bit_fit` or `norm_fit`.
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

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => cmd_train(a),
        Command::Evaluate(a) => cmd_evaluate(a),
        Command::Predict(a) => cmd_predict(a),
        Command::Export(a) => cmd_export(a),
        Command::Doctor => cmd_doctor(),
        Command::Serve(a) => cmd_serve(a),
        Command::Demo(a) => cmd_demo(a),
        Command::Bench(BenchCommand::Serve {
            model,
            seconds,
            clients,
            soak_seconds,
            max_batch_size,
            max_queue_delay_us,
            repeat,
            server_process,
        }) => {
            let clients: Vec<usize> = clients
                .split(',')
                .map(|c| c.trim().parse())
                .collect::<std::result::Result<_, _>>()
                .context("--clients: comma-separated numbers")?;
            let batch = automm::serve::batcher::BatchConfig {
                max_batch_size,
                max_queue_delay: std::time::Duration::from_micros(max_queue_delay_us),
                max_queue_size: 4096,
            };
            let child = if server_process { Some(std::env::current_exe()?) } else { None };
            println!(
                "{:>4} {:>7} {:>12} {:>12} {:>8} {:>9} {:>9} {:>9} {:>7}",
                "run", "clients", "server img/s", "raw ORT img/s", "ratio", "p50 ms", "p99 ms", "avg batch", "errors"
            );
            let mut ratios: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
            let mut soak = None;
            for run in 1..=repeat.max(1) {
                // The soak runs once, after the last repetition.
                let soak_now = if run == repeat.max(1) { soak_seconds } else { 0.0 };
                let (rows, s) =
                    automm::app::bench::serve_load(&model, &clients, seconds, soak_now, batch, child.as_deref())?;
                soak = s;
                for r in &rows {
                    ratios.entry(r.clients).or_default().push(r.server_ips / r.raw_ips);
                    println!(
                        "{run:>4} {:>7} {:>12.1} {:>12.1} {:>8.2} {:>9.2} {:>9.2} {:>9.1} {:>7}",
                        r.clients,
                        r.server_ips,
                        r.raw_ips,
                        r.server_ips / r.raw_ips,
                        r.p50_ms,
                        r.p99_ms,
                        r.avg_batch,
                        r.errors
                    );
                }
            }
            if repeat > 1 {
                for (c, mut v) in ratios {
                    v.sort_by(|a, b| a.total_cmp(b));
                    let list: Vec<String> = v.iter().map(|r| format!("{r:.2}")).collect();
                    println!(
                        "{c} clients: median server/raw {:.2} over {} runs ({})",
                        v[v.len() / 2],
                        v.len(),
                        list.join(", ")
                    );
                }
            }
            if let Some(s) = soak {
                println!(
                    "soak: {soak_seconds:.0}s at {} clients: {:.1} img/s, {} ok, {} errors, RSS {:.1} MB -> {:.1} MB",
                    clients.iter().max().unwrap_or(&0),
                    s.ips,
                    s.ok,
                    s.errors,
                    s.rss_before as f64 / 1e6,
                    s.rss_after as f64 / 1e6
                );
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Soak { model, clients, seconds, sample_seconds, json }) => {
            let r =
                automm::app::bench::mixed_soak(&std::env::current_exe()?, &model, clients, seconds, sample_seconds)?;
            println!("{:<11} {:>8} {:>10}  outcomes", "kind", "sent", "unexpected");
            for (name, t) in [
                ("good", &r.good),
                ("bad image", &r.bad_image),
                ("deadline", &r.deadline),
                ("disconnect", &r.disconnect),
            ] {
                let outcomes: Vec<String> = t.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
                println!("{name:<11} {:>8} {:>10}  {}", t.sent, t.unexpected, outcomes.join(", "));
            }
            let rss: Vec<String> = r.rss.iter().map(|(t, b)| format!("{t:.0}s {:.1}", *b as f64 / 1e6)).collect();
            println!("server RSS MB: {}", rss.join(" | "));
            println!(
                "{:.0}s at {clients} clients; server counted {} ok / {} failed; queue depth at the end {}; SIGTERM exit {}",
                r.seconds,
                r.server_success,
                r.server_failure,
                r.queue_depth_end,
                if r.clean_exit { "0" } else { "NOT clean" }
            );
            for e in &r.examples {
                println!("unexpected: {e}");
            }
            if let Some(p) = json {
                automm::util::fs::write_atomic(&p, serde_json::to_string_pretty(&r)?.as_bytes())?;
            }
            if !r.passed() {
                anyhow::bail!("soak FAILED (see above)");
            }
            println!("soak PASSED");
            Ok(())
        }
        Command::Client(c) => tokio::runtime::Runtime::new()?.block_on(cmd_client(c)),
        Command::Onnx(OnnxCommand::Run { model, input, output, tensor, engine }) => {
            onnx_run(&model, &input, &output, tensor, engine)
        }
        Command::Onnx(OnnxCommand::Grads { model, input, weights, finetune, layers, tensor, output }) => {
            let (hp, _) = automm::train::config::HyperParamsBuilder::new()
                .set("optimization.efficient_finetune", serde_yaml::Value::String(finetune))
                .build()?;
            let proto = automm::onnx::read_model(&model)?;
            let feature = match tensor {
                Some(t) => t,
                None => automm::onnx::detect_feature_tensor(&proto)?,
            };
            let dev = candle_core::Device::Cpu;
            let name = model.display().to_string();
            let g = automm::onnx::Graph::from_model(&proto, &name, &dev, Some(vec![feature.clone()]))?;
            let trainable = automm::train::finetune::select_trainable(&g, hp.efficient_finetune, &layers);
            let x = automm::onnx::read_npy(&input)?;
            let r = automm::onnx::read_npy(&weights)?;
            let input_name = g.inputs().first().map(|i| i.name.clone()).unwrap_or_default();
            let size = x.dims().get(2).copied().unwrap_or(224);
            let tb = automm::train::finetune::TunedBackbone::new(
                &proto,
                &name,
                &dev,
                &input_name,
                &feature,
                &trainable,
                size,
            )?;
            let t0 = std::time::Instant::now();
            let f = tb.features(&tb.front(&x)?, true)?;
            let grads = f.mul(&r.reshape(f.dims())?)?.sum_all()?.backward()?;
            let mut out: Vec<(String, candle_core::Tensor)> = Vec::new();
            for (n, v) in &tb.vars {
                let g = grads.get(v).cloned().unwrap_or(v.as_tensor().zeros_like()?);
                out.push((n.clone(), g));
            }
            candle_core::Tensor::write_npz(&out.iter().map(|(n, t)| (n.as_str(), t)).collect::<Vec<_>>(), &output)?;
            println!(
                "{} initializers, forward+backward {:.1}s, wrote {}",
                out.len(),
                t0.elapsed().as_secs_f64(),
                output.display()
            );
            Ok(())
        }
        Command::Onnx(OnnxCommand::Compare { model, input, batch, tensor, runs, threads, json, profile }) => {
            let x = match &input {
                Some(p) => automm::onnx::read_npy(p)?,
                None => random_input(&model, batch)?,
            };
            let tensor = match tensor.as_deref() {
                Some("features") => Some(automm::onnx::detect_feature_tensor(&automm::onnx::read_model(&model)?)?),
                other => other.map(str::to_string),
            };
            let c = automm::deploy::engine::compare(&model, &x, tensor.as_deref(), runs, threads)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                println!(
                    "model {}  tensor `{}`  input {:?} -> {:?}",
                    c.model.display(),
                    c.tensor,
                    c.input_shape,
                    c.output_shape
                );
                println!("max |candle - ort| = {:.3e}", c.max_abs_diff);
                let ort_ms = c.timings[1].ms_per_image;
                for t in &c.timings {
                    println!("{:<7} {:>9.2} ms/img  ({:.2}x ORT)", t.engine, t.ms_per_image, t.ms_per_image / ort_ms);
                }
            }
            if profile {
                let g = automm::onnx::Graph::load(&model, &candle_core::Device::Cpu, tensor.clone().map(|t| vec![t]))?;
                let name = g.inputs().first().map(|i| i.name.clone()).unwrap_or_default();
                let feeds = [(name.as_str(), x.clone())];
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
            Ok(())
        }
    }
}

fn cmd_train(a: TrainArgs) -> Result<()> {
    let mut b = HyperParamsBuilder::new();
    if let Some(c) = &a.config {
        b = b.file(c)?;
    }
    for kv in &a.hp {
        b = b.set_str(kv)?;
    }
    let log_phase = |e: &Event| {
        if let Event::Phase(p) = e {
            tracing::info!("phase: {p}");
        }
    };
    let (summary, output) = if let Some(dir) = a.resume {
        let opts = ResumeOptions { overrides: b, quiet: a.quiet, cancel: None };
        (resume(&dir, &opts, log_phase)?, dir)
    } else {
        let (hp, warnings) = b.build()?;
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        // clap guarantees these without --resume.
        let need = |what: &str| anyhow::anyhow!("--{what} is required");
        let output = a.output.ok_or_else(|| need("output"))?;
        let req = TrainRequest {
            train_data: a.train_data.ok_or_else(|| need("train-data"))?,
            label: a.label.ok_or_else(|| need("label"))?,
            image_column: a.image_column,
            tuning_data: a.tuning_data,
            backbone: a.backbone.ok_or_else(|| need("backbone"))?,
            feature_tensor: a.feature_tensor,
            normalization: Normalization::parse(&a.normalization)?,
            output: output.clone(),
            hp,
            quiet: a.quiet,
            cancel: None,
        };
        (train(&req, log_phase)?, output)
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!("epoch  train_loss  val_{}", summary.val_metric);
    for h in &summary.history {
        let mark = if h.epoch == summary.best_epoch { " *" } else { "" };
        println!("{:>5}  {:>10.4}  {:>8.4}{mark}", h.epoch, h.train_loss, h.val_score);
    }
    let (pre, main) = if summary.finetuned.is_empty() {
        ("features", "head")
    } else {
        ("image cache/frozen prefix", "fine-tuning backbone + head")
    };
    println!(
        "\n{} training rows, {} validation rows ({}); {pre} {:.1}s, {main} {:.1}s ({:.1}s per epoch)\n",
        summary.num_train,
        summary.num_val,
        summary.validation_source,
        summary.feature_seconds,
        summary.train_seconds,
        summary.seconds_per_epoch
    );
    print!("{}", metrics::summary_table(&summary.validation));
    println!("\nmodel folder: {}", output.display());
    Ok(())
}

fn cmd_evaluate(a: EvaluateArgs) -> Result<()> {
    let names: Vec<String> = a.metrics.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    let names = metrics::parse_names("--metrics", &names)?;
    let p = Predictor::load(&a.model, &select_device(0))?;
    let table = Table::load_with_hint(&a.data, Some(&p.config.label_column), &p.config.image_column)?;
    let r = p.evaluate(&table, a.quiet)?;
    if a.json {
        let mut m: serde_json::Map<String, serde_json::Value> =
            names.iter().map(|n| (n.name().to_string(), serde_json::json!(r.get(*n)))).collect();
        let recall: serde_json::Map<String, serde_json::Value> =
            r.classes.iter().zip(&r.per_class_recall).map(|(c, v)| (c.clone(), serde_json::json!(v))).collect();
        m.insert("per_class_recall".into(), recall.into());
        m.insert("confusion_matrix".into(), serde_json::json!(r.confusion));
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        for n in &names {
            match r.get(*n) {
                Some(v) => println!("{:<18} {v:.4}", n.name()),
                None => println!("{:<18} n/a", n.name()),
            }
        }
        println!();
        print!("{}", metrics::summary_table(&r));
    }
    Ok(())
}

fn cmd_predict(a: PredictArgs) -> Result<()> {
    let is_onnx = a.model.is_file() && a.model.extension().is_some_and(|e| e == "onnx");
    let t0 = std::time::Instant::now();
    let (rows, engine) = if is_onnx {
        let m = ExportedModel::open_with(&a.model, a.engine, a.threads, a.num_gpus != 0, true)?;
        let table = Table::load(&a.data, None, None)?;
        table.check_files()?;
        let files = table.all_image_refs();
        let preds = m.predict_files(&files, a.batch_size, a.quiet)?;
        write_predictions(&table, &m.meta.classes, &preds, &a.output)?;
        (table.rows.len(), m.engine)
    } else if a.engine == Some(EngineKind::Ort) {
        // A model folder on ORT: export it (merged) to a temporary file and run that.
        let tmp = tempfile::tempdir()?;
        let onnx = tmp.path().join("model.onnx");
        let opts =
            ExportOptions { kind: ExportKind::Merged, opset: None, verify: false, verify_data: None, verify_images: 0 };
        automm::deploy::export::export(&a.model, &onnx, &opts)?;
        return cmd_predict(PredictArgs { model: onnx, ..a });
    } else {
        let mut p = Predictor::load(&a.model, &select_device(0))?;
        p.batch_size = a.batch_size;
        let table = Table::load_with_hint(&a.data, None, &p.config.image_column)?;
        let preds = p.predict_table(&table, a.quiet)?;
        write_predictions(&table, &p.config.classes, &preds, &a.output)?;
        (table.rows.len(), EngineKind::Candle)
    };
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "wrote {rows} predictions to {} ({:?} engine, {:.1} images/s)",
        a.output.display(),
        engine,
        rows as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn cmd_export(a: ExportArgs) -> Result<()> {
    let kind = if a.head_only {
        ExportKind::HeadOnly
    } else if a.with_preprocessing {
        ExportKind::WithPreprocessing
    } else {
        ExportKind::Merged
    };
    let opts = ExportOptions {
        kind,
        opset: a.opset,
        verify: a.verify,
        verify_data: a.verify_data,
        verify_images: a.verify_images,
    };
    let r = automm::deploy::export::export(&a.model, &a.output, &opts)?;
    println!("wrote {} ({}, {:.1} MB)", r.path.display(), kind.name(), r.bytes as f64 / 1e6);
    if let Some(v) = r.verification {
        println!(
            "verified on {} images with the {} engine: max |probability difference| {:.2e} (tolerance {:.0e}), labels {}",
            v.images,
            v.engine,
            v.max_abs_diff,
            v.tolerance,
            if v.labels_equal { "identical" } else { "DIFFER" }
        );
    }
    Ok(())
}

fn cmd_doctor() -> Result<()> {
    println!("automm {}", env!("CARGO_PKG_VERSION"));
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("threads: {threads} available; rayon pool {}", rayon::current_num_threads());
    match automm::deploy::engine::ort::locate() {
        Ok(loc) => {
            println!("ONNX Runtime: {} (found via {})", loc.path.display(), loc.source);
            match automm::deploy::engine::ort::loaded() {
                Ok((_, info)) => println!("  {info}"),
                Err(e) => println!("  cannot load it: {e}"),
            }
        }
        Err(e) => println!("ONNX Runtime: not found. {e}"),
    }
    println!("CUDA (candle): {}", automm::util::device::cuda_status());
    println!("CUDA (ONNX Runtime): {}", automm::deploy::engine::ort::cuda_status());
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

fn onnx_run(
    model: &std::path::Path,
    input: &std::path::Path,
    output: &std::path::Path,
    tensor: Option<String>,
    engine: EngineKind,
) -> Result<()> {
    let x = automm::onnx::read_npy(input)?;
    let y = match engine {
        EngineKind::Candle => {
            let g = automm::onnx::Graph::load(model, &candle_core::Device::Cpu, tensor.map(|t| vec![t]))?;
            let name = g.inputs().first().context("the model has no inputs")?.name.clone();
            g.run(&[(name.as_str(), x)])?.into_iter().next().context("no output")?
        }
        EngineKind::Ort => {
            let tmp = tempfile::tempdir()?;
            let path = match &tensor {
                Some(t) => automm::deploy::engine::with_output(model, t, tmp.path())?,
                None => model.to_path_buf(),
            };
            let s = automm::deploy::engine::ort::OrtSession::open(&path, 0)?;
            let name = s.inputs.first().context("the model has no inputs")?.clone();
            let data: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let (shape, v) = s.run_f32(&[(name.as_str(), x.dims(), &data)])?.into_iter().next().context("no output")?;
            candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?
        }
    };
    let tmp = output.with_extension("npy.tmp");
    y.write_npy(&tmp)?;
    std::fs::rename(&tmp, output)?;
    println!("wrote {} {:?}", output.display(), y.dims());
    Ok(())
}

fn cmd_serve(a: ServeArgs) -> Result<()> {
    let auth_token = match &a.auth_token_file {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim().to_string())
        }
        None => None,
    };
    let cfg = automm::serve::ServeConfig {
        model: a.model,
        listen: a.listen,
        metrics_listen: a.metrics_listen,
        batch: automm::serve::batcher::BatchConfig {
            max_batch_size: a.max_batch_size.max(1),
            max_queue_delay: std::time::Duration::from_micros(a.max_queue_delay_us),
            max_queue_size: a.max_queue_size.max(1),
        },
        engine: a.engine,
        threads: a.threads,
        num_gpus: a.num_gpus,
        tls: a.tls_cert.zip(a.tls_key),
        auth_token,
        max_request_bytes: a.max_request_bytes,
        data_root: a.data_root,
        backbone: a.backbone,
        work_dir: a.work_dir,
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if let Ok(r) = rx.await {
                let r: automm::serve::Running = r;
                eprintln!(
                    "automm serving on {}{}",
                    r.addr,
                    r.metrics_addr.map(|m| format!(", metrics on http://{m}/metrics")).unwrap_or_default()
                );
            }
        });
        automm::serve::serve(cfg, shutdown_signal(), Some(tx)).await
    })?;
    eprintln!("automm: stopped after draining the queue");
    Ok(())
}

/// Resolves on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

async fn connect(s: &ServerArgs) -> Result<automm::client::Client> {
    let token = match &s.token_file {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim().to_string())
        }
        None => None,
    };
    let ca = match &s.ca_cert {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    Ok(automm::client::Client::connect(&s.server, token.as_deref(), ca.as_deref()).await?)
}

async fn cmd_client(c: ClientCommand) -> Result<()> {
    match c {
        ClientCommand::Health { server } => {
            let ok = connect(&server).await?.health("").await?;
            println!("{}", if ok { "SERVING" } else { "NOT_SERVING" });
            if !ok {
                anyhow::bail!("the server is not serving");
            }
        }
        ClientCommand::Info { server } => {
            let i = connect(&server).await?.model_info().await?;
            println!(
                "version {}  engine {}  input `{}` [N, 3, {}, {}]  max batch {}",
                i.version, i.engine, i.input_name, i.input_size, i.input_size, i.max_batch_size
            );
            println!("classes {:?}\npreprocessing {}", i.classes, i.preprocessing_json);
        }
        ClientCommand::Predict { server, data, output, batch_size } => {
            let client = connect(&server).await?;
            let info = client.model_info().await?;
            let table = Table::load(&data, None, None)?;
            table.check_files()?;
            let pb = automm::util::progress::progress(table.rows.len() as u64, "predict", false);
            let k = info.classes.len();
            let (mut probs, mut preds) = (Vec::new(), Vec::new());
            for chunk in table.rows.chunks(batch_size.max(1)) {
                let images: Vec<Vec<u8>> = chunk
                    .iter()
                    .map(|r| std::fs::read(&r.image).with_context(|| format!("reading {}", r.image.display())))
                    .collect::<Result<_>>()?;
                let resp = client.predict(images).await?;
                for p in resp.predictions {
                    if p.probabilities.len() != k {
                        anyhow::bail!("the server returned {} probabilities for {k} classes", p.probabilities.len());
                    }
                    probs.extend(p.probabilities);
                    preds.push(p.class_index as u32);
                }
                pb.inc(chunk.len() as u64);
            }
            pb.finish_and_clear();
            write_predictions(&table, &info.classes, &automm::model::Predictions { probs, preds }, &output)?;
            println!("wrote {} predictions to {} (model version {})", table.rows.len(), output.display(), info.version);
        }
        ClientCommand::Fit { server, train_data, label, tuning_data, hp } => {
            let client = connect(&server).await?;
            let mut hps = std::collections::HashMap::new();
            for kv in &hp {
                let (k, v) = kv.split_once('=').with_context(|| format!("--hp {kv}: expected KEY=VALUE"))?;
                hps.insert(k.trim().to_string(), v.trim().to_string());
            }
            let pb = indicatif::ProgressBar::new_spinner();
            pb.enable_steady_tick(std::time::Duration::from_millis(200));
            let req = automm::proto::FitRequest {
                train_data,
                label,
                tuning_data: tuning_data.unwrap_or_default(),
                hyperparameters: hps,
                ..Default::default()
            };
            let r = client
                .fit_request(req, &mut |ev| match &ev.event {
                    Some(automm::proto::fit_event::Event::Phase(p)) => pb.set_message(format!("phase: {p}")),
                    Some(automm::proto::fit_event::Event::Epoch(e)) => pb.set_message(format!(
                        "epoch {} loss {:.4} {} {:.3}",
                        e.epoch, e.train_loss, e.val_metric, e.val_score
                    )),
                    _ => {}
                })
                .await
                .map_err(|s| anyhow::anyhow!("Fit failed: {:?}: {}", s.code(), s.message()))?;
            pb.finish_and_clear();
            println!("new model version {} (best epoch {})", r.model_version, r.best_epoch);
            let mut m: Vec<_> = r.metrics.into_iter().collect();
            m.sort_by(|a, b| a.0.cmp(&b.0));
            for (k, v) in m {
                println!("{k:<18} {v:.4}");
            }
        }
    }
    Ok(())
}

fn cmd_demo(a: DemoArgs) -> Result<()> {
    let opts = automm::app::demo::DemoOptions {
        work_dir: a.work_dir,
        backbone: a.backbone,
        normalization: a.normalization.as_deref().map(Normalization::parse).transpose()?,
        data: a.data.zip(a.label),
        epochs: a.epochs,
        quiet: a.quiet,
        ..Default::default()
    };
    let r = automm::app::demo::run(&opts, |line| eprintln!("==> {line}"))?;
    println!("\nTest-set results (backbone {}):\n", r.backbone.display());
    print!("{}", automm::app::demo::comparison_table(&r));
    let i = r.focal.classes.iter().position(|c| *c == r.minority).unwrap_or(0);
    let (ce, fo) = (r.cross_entropy.per_class_recall[i], r.focal.per_class_recall[i]);
    println!(
        "\nminority class `{}`: recall {:.3} with cross-entropy, {:.3} with focal loss ({})",
        r.minority,
        ce,
        fo,
        if fo > ce { "focal loss raised it" } else { "focal loss did NOT raise it on this run" }
    );
    println!(
        "server ({} engine) vs local predictions: max |probability difference| {:.2e}, labels {}",
        r.server_engine,
        r.server_max_abs_diff,
        if r.server_labels_equal { "identical" } else { "DIFFER" }
    );
    println!("\nartefacts:");
    for (what, p) in &r.artefacts {
        println!("  {what:<28} {}", p.display());
    }
    println!("\ndone in {:.0}s", r.seconds);
    if !r.server_labels_equal || r.server_max_abs_diff > 1e-4 {
        anyhow::bail!("served predictions differ from local ones");
    }
    Ok(())
}
