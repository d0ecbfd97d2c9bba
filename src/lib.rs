//! automm: train-and-deploy image classification on imbalanced data.
//!
//! The modules are the pipeline's stages, each importing only those before it
//! (`scripts/check-modules.py` checks this):
//!
//! ```text
//! util -> data -> onnx -> model -> train -> deploy -> serve -> client, app
//! ```
//!
//! - [`util`]: atomic files, sha256, progress bars, the compute device, named enums.
//! - [`data`]: tables of image paths and labels, image decoding/preprocessing, augmentation.
//! - [`onnx`]: the ONNX engine (import into candle, our kernels, plans); imports only `util`/`error`.
//! - [`model`]: the model folder, recorded hyperparameters, the head and its predictions, the frozen
//!   backbone, metrics.
//! - [`train`]: hyperparameter keys, losses, AdamW, the schedule, the one training loop over a feature
//!   source (cached features or a backbone being fine-tuned), checkpoints, plots.
//! - [`deploy`]: export to ONNX, verification, prediction, the engines (candle, ONNX Runtime); never
//!   imports `train`.
//! - [`serve`]: the gRPC server (its Fit job is the only caller of `train` above it).
//! - [`client`]: the gRPC client; imports only the protocol.
//! - [`app`]: the demo, generated data and benchmarks.

pub mod app;
pub mod client;
pub mod data;
pub mod deploy;
pub mod error;
pub mod model;
pub mod onnx;
pub mod serve;
pub mod train;
pub mod util;

pub use error::{Error, Result};

/// Generated gRPC types and services of `proto/automm/v1/automm.proto`.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("automm.v1");
    /// The encoded file descriptor set (automm.v1 and inference), for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("automm_descriptor");
}

/// Generated gRPC types and services of `proto/inference/grpc_service.proto`: the KServe Open Inference
/// Protocol v2 (`inference.GRPCInferenceService`) with Triton's ModelConfig and ModelStatistics.
pub mod inference_proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("inference");
}
