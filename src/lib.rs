//! automm: train-and-deploy image classification on imbalanced data.
//!
//! Data flows one way: a table of image paths and labels ([`data`]) -> preprocessed images -> backbone
//! features from an imported ONNX graph ([`onnx`], [`backbone`]) -> a linear head trained with focal loss
//! or cross-entropy ([`loss`], [`train`]) -> metrics ([`metrics`]), the model folder ([`model`]) and
//! predictions ([`predict`]).

pub mod backbone;
pub mod config;
pub mod data;
pub mod error;
pub mod export;
pub mod infer;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod onnx;
pub mod predict;
pub mod synth;
pub mod train;
pub mod verify;

pub use error::{Error, Result};
