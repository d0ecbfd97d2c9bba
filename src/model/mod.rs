//! What a trained model is, independent of how it was trained: the model folder ([`folder`]: config,
//! files), the resolved hyperparameters it records ([`hparams`]), the linear head and its predictions
//! ([`head`]), the frozen backbone that turns images into features ([`backbone`]), and the metrics a
//! model's predictions score ([`metrics`]), and the post-hoc prior correction of its logits ([`prior`]). Both training and deployment build on this.

pub mod backbone;
pub mod folder;
pub mod head;
pub mod hparams;
pub mod metrics;
pub mod normalization;
pub mod prior;

pub use backbone::Backbone;
pub use folder::{BackboneInfo, ModelConfig, ModelDir, VERSION};
pub use head::{Head, Predictions};
