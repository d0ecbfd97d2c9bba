//! `automm bench`: benchmarks that print a table (ratios against a baseline measured in the same run).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

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
        /// The protocol the clients speak: automm (automm.v1 Predict) or v2 (KServe v2 / Triton ModelInfer).
        #[arg(long, value_enum, default_value = "automm")]
        protocol: automm::app::bench::Protocol,
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
    /// Fine-tuning cost: ms/img of a forward pass and of a training step (forward + backward + AdamW)
    /// through an ONNX backbone, and peak RSS, next to PyTorch's same architecture measured by
    /// `models/bench_finetune.py` in the same run (ratios ours / PyTorch).
    Finetune(FinetuneArgs),
}

/// `automm bench finetune`'s arguments.
#[derive(clap::Args, Debug)]
pub struct FinetuneArgs {
    /// The backbone ONNX (for full fine-tuning, an export that keeps every parameter as an
    /// initializer, e.g. `models/export_swin_tiny.py --features --parameters`).
    #[arg(long)]
    model: PathBuf,
    /// The timm architecture PyTorch runs (e.g. swin_tiny_patch4_window7_224, efficientnet_lite0);
    /// without it only automm's figures are printed.
    #[arg(long)]
    torch_arch: Option<String>,
    /// Images per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Timed steps (after one warm-up; medians are reported).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// What trains: `full` (model.backbone.freeze=false), `bit_fit`, `norm_fit` or `frozen`
    /// (the head on features computed without gradients).
    #[arg(long, default_value = "full")]
    finetune: String,
    /// The Python with torch and timm installed.
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// PyTorch's side.
    #[arg(long, default_value = "models/bench_finetune.py")]
    script: PathBuf,
    /// Also print where automm's tracked forward pass spends its time, by op type.
    #[arg(long)]
    profile: bool,
    /// Like env.num_gpus: 1 runs both sides on GPU 0 (automm built with --features cuda; PyTorch with
    /// `--device cuda`). Peak memory is then the GPU's (PyTorch) and the host's RSS (automm).
    #[arg(long, default_value_t = 0)]
    num_gpus: i64,
}

/// Runs one benchmark.
pub fn run(c: BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Serve {
            model,
            seconds,
            clients,
            soak_seconds,
            max_batch_size,
            max_queue_delay_us,
            repeat,
            server_process,
            protocol,
        } => serve_load(
            model,
            seconds,
            &clients,
            soak_seconds,
            max_batch_size,
            max_queue_delay_us,
            repeat,
            server_process,
            protocol,
        ),
        BenchCommand::Soak { model, clients, seconds, sample_seconds, json } => {
            soak(model, clients, seconds, sample_seconds, json)
        }
        BenchCommand::Finetune(a) => finetune_bench(&a),
    }
}

fn finetune_bench(a: &FinetuneArgs) -> Result<()> {
    let (batch, steps, finetune) = (a.batch, a.steps, a.finetune.as_str());
    use automm::app::finetune_bench::{measure, FinetuneBench, FinetuneFigures};
    use automm::model::hparams::{HyperParams, FULL_FINETUNE_LR};
    let mut hp = HyperParams { learning_rate: FULL_FINETUNE_LR, ..Default::default() };
    match finetune {
        "full" => hp.freeze = false,
        "frozen" => {}
        m => hp.efficient_finetune = m.parse().map_err(|e| anyhow::anyhow!("--finetune: {e} (or full, frozen)"))?,
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let device = automm::util::device::select_device(a.num_gpus);
    let torch_device = if device.is_cuda() { "cuda" } else { "cpu" };
    // PyTorch first, in its own process, so that neither side's memory or caches affect the other's.
    let torch: Option<FinetuneFigures> = match a.torch_arch.as_deref() {
        None => None,
        Some(arch) => {
            let out = std::process::Command::new(&a.python)
                .arg(&a.script)
                .args(["--arch", arch, "--finetune", finetune, "--device", torch_device])
                .args(["--batch", &batch.to_string(), "--threads", &threads.to_string(), "--steps", &steps.to_string()])
                .output()
                .with_context(|| format!("running {} {}", a.python.display(), a.script.display()))?;
            if !out.status.success() {
                anyhow::bail!("PyTorch's side failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let line = String::from_utf8_lossy(&out.stdout);
            Some(serde_json::from_str(line.trim()).with_context(|| format!("PyTorch's side printed `{line}`"))?)
        }
    };
    let b = FinetuneBench { batch, steps, classes: 4, hp, device: device.clone() };
    let ours = measure(&a.model, &b)?;
    let on = if device.is_cuda() { "GPU 0".to_string() } else { format!("{threads} threads") };
    println!("batch {batch}, {on}, mode {finetune}, median of {steps} steps");
    println!(
        "{:<8} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "ms/img", "forward", "train step", "= fwd", "+ bwd", "+ AdamW", "peak GB", "trained"
    );
    let row = |who: &str, f: &FinetuneFigures| {
        println!(
            "{who:<8} {:>9.1} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>9.2} {:>10}",
            f.fwd_ms_per_img,
            f.step_ms_per_img,
            f.step_fwd_ms_per_img,
            f.step_bwd_ms_per_img,
            f.step_opt_ms_per_img,
            f.peak_rss_bytes as f64 / 1e9,
            f.params
        )
    };
    row("automm", &ours);
    if let Some(t) = &torch {
        row("PyTorch", t);
        let r = |a: f64, b: f64| a / b;
        println!(
            "{:<8} {:>9.2} {:>10.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            "ratio",
            r(ours.fwd_ms_per_img, t.fwd_ms_per_img),
            r(ours.step_ms_per_img, t.step_ms_per_img),
            r(ours.step_fwd_ms_per_img, t.step_fwd_ms_per_img),
            r(ours.step_bwd_ms_per_img, t.step_bwd_ms_per_img),
            r(ours.step_opt_ms_per_img, t.step_opt_ms_per_img),
            // On a GPU PyTorch reports the device's peak and automm the host's: not comparable.
            if device.is_cuda() { f64::NAN } else { r(ours.peak_rss_bytes as f64, t.peak_rss_bytes as f64) }
        );
    }
    if a.profile {
        println!("automm's forward pass with gradients tracked, by op type (ms/img):");
        for (op, ms) in ours.forward_ops.iter().take(15) {
            println!("  {op:<28} {ms:>8.2}");
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn serve_load(
    model: PathBuf,
    seconds: f64,
    clients: &str,
    soak_seconds: f64,
    max_batch_size: usize,
    max_queue_delay_us: u64,
    repeat: usize,
    server_process: bool,
    protocol: automm::app::bench::Protocol,
) -> Result<()> {
    let clients: Vec<usize> = clients
        .split(',')
        .map(|c| c.trim().parse())
        .collect::<std::result::Result<_, _>>()
        .context("--clients: comma-separated numbers")?;
    let batch = automm::serve::batcher::BatchConfig {
        max_batch_size,
        max_queue_delay: std::time::Duration::from_micros(max_queue_delay_us),
        max_queue_size: 4096,
        ..Default::default()
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
        let (rows, s) = automm::app::bench::serve_load(
            &model,
            &clients,
            seconds,
            soak_now,
            batch.clone(),
            child.as_deref(),
            protocol,
        )?;
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

fn soak(model: PathBuf, clients: usize, seconds: f64, sample_seconds: f64, json: Option<PathBuf>) -> Result<()> {
    let r = automm::app::bench::mixed_soak(&std::env::current_exe()?, &model, clients, seconds, sample_seconds)?;
    println!("{:<11} {:>8} {:>10}  outcomes", "kind", "sent", "unexpected");
    for (name, t) in
        [("good", &r.good), ("bad image", &r.bad_image), ("deadline", &r.deadline), ("disconnect", &r.disconnect)]
    {
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
    let p = &r.probes;
    println!(
        "probes: 200 one-pixel PNGs -> {} (server RSS {:.1} MB -> {:.1} MB); 16384x1 PNG -> {} in {:.2}s; SIGTERM with a \
         half-open connection: exit in {:.2}s",
        p.burst_status,
        p.burst_rss.0 as f64 / 1e6,
        p.burst_rss.1 as f64 / 1e6,
        p.bomb_status,
        p.bomb_seconds,
        p.sigterm_seconds
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
