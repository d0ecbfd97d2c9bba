//! automm: train-and-deploy image classification on imbalanced data.
//!
//! Data flows one way: a table of image paths and labels ([`data`]) -> preprocessed images -> backbone
//! features from an imported ONNX graph ([`onnx`], [`backbone`]) -> a linear head trained with focal loss
//! or cross-entropy ([`loss`], [`train`]) -> metrics ([`metrics`]), the model folder ([`model`]) and
//! predictions ([`predict`]).

pub mod backbone;
pub mod bench;
pub mod checkpoint;
pub mod client;
pub mod config;
pub mod data;
pub mod demo;
pub mod error;
pub mod export;
pub mod finetune;
pub mod infer;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod onnx;
pub mod optim;
pub mod predict;
pub mod server;
pub mod synth;
pub mod train;
pub mod verify;

pub use error::{Error, Result};

/// Generated gRPC types and services of `proto/automm/v1/automm.proto`.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("automm.v1");
    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("automm_descriptor");
}
