//! The integration tests: one binary (one link of candle, polars, tonic and ort), a module per area.
//! Shared helpers live in `common`.

mod common;

mod candle_path;
mod config;
mod conformance;
mod demo;
mod export;
mod finetune;
mod focal_loss;
mod head_pin;
mod hostile;
mod import_parity;
mod kserve;
mod ort_engine;
mod pooling;
mod readme;
mod resume;
mod serve;
mod train_cli;
