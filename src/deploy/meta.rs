//! What an exported ONNX file says about itself: the export kinds, the `metadata_props` keys automm
//! writes (classes, preprocessing, hyperparameters, version, backbone sha256) and their typed reading.
//! Export writes them; verification and every engine read them.

use candle_onnx::onnx::ModelProto;
use serde::{Deserialize, Serialize};

use crate::data::Preprocess;
use crate::error::{Error, Result};

crate::named_enum! {
    /// What to export.
    pub enum ExportKind("export kind") {
        /// Backbone + head: input image tensor `[N, 3, S, S]` float32 (preprocessed).
        Merged = "merged",
        /// Head only: input `features` `[N, D]`.
        HeadOnly = "head_only",
        /// Backbone + head with preprocessing inside: input `images` uint8 `[N, S, S, 3]`.
        WithPreprocessing = "with_preprocessing",
    }
}

/// Metadata keys written into `metadata_props`.
pub mod keys {
    /// JSON list of class labels in class order.
    pub const CLASSES: &str = "automm.classes";
    /// JSON of [`crate::data::Preprocess`].
    pub const PREPROCESS: &str = "automm.preprocess";
    /// JSON of the resolved hyperparameters.
    pub const HYPERPARAMETERS: &str = "automm.hyperparameters";
    /// Human-readable loss.
    pub const LOSS: &str = "automm.loss";
    /// automm version.
    pub const VERSION: &str = "automm.version";
    /// sha256 of the source backbone ONNX.
    pub const BACKBONE_SHA256: &str = "automm.backbone_sha256";
    /// merged | head_only | with_preprocessing.
    pub const KIND: &str = "automm.kind";
    /// The graph input.
    pub const INPUT: &str = "automm.input";
    /// JSON of the [`crate::model::prior::PriorCorrection`] baked into the head, when there is one.
    pub const PRIOR_CORRECTION: &str = "automm.prior_correction";
}

/// Output names of every exported model.
pub const LOGITS: &str = "logits";
/// Softmax of the logits.
pub const PROBABILITIES: &str = "probabilities";

/// What an exported model says about itself (read back from metadata).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportMeta {
    /// Class labels.
    pub classes: Vec<String>,
    /// Preprocessing.
    pub preprocess: Preprocess,
    /// Kind.
    pub kind: ExportKind,
    /// The input's name.
    pub input: String,
    /// automm version that wrote it.
    pub version: String,
    /// Backbone sha256.
    pub backbone_sha256: String,
}

impl ExportMeta {
    /// Reads automm's metadata from a model; the error names the missing key.
    pub fn read(model: &ModelProto, what: &str) -> Result<ExportMeta> {
        let get = |k: &str| {
            model.metadata_props.iter().find(|p| p.key == k).map(|p| p.value.clone()).ok_or_else(|| {
                Error::onnx(what, format!("metadata `{k}` is missing; was this file written by `automm export`?"))
            })
        };
        let json_err = |k: &str, e: serde_json::Error| Error::onnx(what, format!("metadata `{k}` is not valid: {e}"));
        let kind_s = get(keys::KIND)?;
        Ok(ExportMeta {
            classes: serde_json::from_str(&get(keys::CLASSES)?).map_err(|e| json_err(keys::CLASSES, e))?,
            preprocess: serde_json::from_str(&get(keys::PREPROCESS)?).map_err(|e| json_err(keys::PREPROCESS, e))?,
            kind: kind_s.parse().map_err(|e| Error::onnx(what, format!("metadata `{}`: {e}", keys::KIND)))?,
            input: get(keys::INPUT)?,
            version: get(keys::VERSION)?,
            backbone_sha256: get(keys::BACKBONE_SHA256)?,
        })
    }
}
