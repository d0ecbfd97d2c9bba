//! A trained model put to use without training code: export to ONNX ([`export`], metadata in [`meta`]),
//! verification of an export against the model folder ([`verify`]), batch prediction and evaluation
//! with the model folder ([`predict`]), and the inference engines ([`engine`]: our candle importer and
//! ONNX Runtime), and Triton model repositories ([`triton`]).

pub mod engine;
pub mod export;
pub mod meta;
pub mod predict;
pub mod triton;
pub mod verify;
