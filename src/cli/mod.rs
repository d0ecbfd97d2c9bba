//! Command-line interface: typed arguments (clap derive) per command, one file each; every command
//! parses, makes one library call and prints. Printing lives here; the work lives in the library.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench;
mod client;
mod demo;
mod doctor;
mod evaluate;
mod export;
mod onnx;
mod predict;
mod serve;
mod train;

pub use bench::BenchCommand;
pub use client::ClientCommand;
pub use demo::DemoArgs;
pub use evaluate::EvaluateArgs;
pub use export::ExportArgs;
pub use onnx::OnnxCommand;
pub use predict::PredictArgs;
pub use serve::ServeArgs;
pub use train::TrainArgs;

/// automm: train and deploy image classifiers on imbalanced data.
#[derive(Parser, Debug)]
#[command(name = "automm", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More logging (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Quiet: no progress bars and no INFO lines, only warnings, errors and the results.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a classifier on an ONNX backbone: a head on frozen features (default), or with part or all of
    /// the backbone fine-tuned (`automm train --help` explains the three modes).
    #[command(after_long_help = train::MODES)]
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
    /// The whole product in one offline command: the shipped clothing photos and pretrained backbone,
    /// cross-entropy vs focal loss vs automm's default, export with verification, gRPC serving.
    Demo(DemoArgs),
    /// Call an automm server.
    #[command(subcommand)]
    Client(ClientCommand),
    /// Benchmarks that print a table (ratios against a baseline measured in the same run).
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> Result<()> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Train(a) => train::cmd_train(TrainArgs { quiet, ..a }),
        Command::Evaluate(a) => evaluate::cmd_evaluate(EvaluateArgs { quiet, ..a }),
        Command::Predict(a) => predict::cmd_predict(PredictArgs { quiet, ..a }),
        Command::Export(a) => export::cmd_export(a),
        Command::Doctor => doctor::cmd_doctor(),
        Command::Serve(a) => serve::cmd_serve(a),
        Command::Demo(a) => demo::cmd_demo(DemoArgs { quiet, ..a }),
        Command::Bench(c) => bench::run(c),
        Command::Client(c) => tokio::runtime::Runtime::new()?.block_on(client::cmd_client(c)),
        Command::Onnx(c) => onnx::run(c),
    }
}

/// `--prior-correction TAU [--target-prior P1,...]` as a checked correction (None without the flag).
fn prior_correction(tau: Option<f64>, target: Option<&str>) -> Result<Option<automm::model::prior::PriorCorrection>> {
    let Some(tau) = tau else { return Ok(None) };
    let target = target.map(automm::model::prior::parse_prior).transpose()?;
    Ok(Some(automm::model::prior::PriorCorrection::new(tau, target)?))
}
