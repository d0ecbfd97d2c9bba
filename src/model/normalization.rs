//! What a backbone says about its pixel normalisation, so `train` uses the preprocessing the model was
//! trained with instead of silently assuming ImageNet's. Looked up in order: the ONNX file's
//! `automm.normalization` metadata (automm's shipped backbones), an automm export's `automm.preprocess`,
//! then a companion file next to it: timm's `config.json` (`pretrained_cfg.mean/std` or top-level
//! `mean`/`std`) or Hugging Face's `preprocessor_config.json` (`image_mean`/`image_std`).

use std::path::Path;

use crate::data::{Normalization, Preprocess};
use crate::error::{Error, Result};
use crate::onnx::metadata_value;

/// A normalisation and where it was read (for the log line that names the choice).
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The normalisation.
    pub normalization: Normalization,
    /// Where it came from, e.g. ``metadata `automm.normalization` of b.onnx``.
    pub source: String,
}

/// The normalisation `backbone` records, if any (see the module doc for where it looks).
pub fn recorded(backbone: &Path) -> Result<Option<Recorded>> {
    let file = backbone.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(v) = metadata_value(backbone, "automm.normalization")? {
        let normalization = Normalization::parse(v.trim()).map_err(|e| {
            Error::onnx(backbone.display().to_string(), format!("metadata `automm.normalization`: {e}"))
        })?;
        return Ok(Some(Recorded { normalization, source: format!("metadata `automm.normalization` of {file}") }));
    }
    if let Some(v) = metadata_value(backbone, "automm.preprocess")? {
        let p: Preprocess = serde_json::from_str(&v).map_err(|e| {
            Error::onnx(backbone.display().to_string(), format!("metadata `automm.preprocess` is not automm's: {e}"))
        })?;
        return Ok(Some(Recorded {
            normalization: p.normalization,
            source: format!("metadata `automm.preprocess` of {file}"),
        }));
    }
    let dir = backbone.parent().unwrap_or(Path::new("."));
    for (name, mean_key, std_key) in
        [("config.json", "mean", "std"), ("preprocessor_config.json", "image_mean", "image_std")]
    {
        let path = dir.join(name);
        if let Some(n) = companion(&path, mean_key, std_key)? {
            return Ok(Some(Recorded { normalization: n, source: path.display().to_string() }));
        }
    }
    Ok(None)
}

/// Mean/std from a companion JSON file (top level or under timm's `pretrained_cfg`); None when the file
/// is missing or says nothing about them; an error when it says something malformed.
fn companion(path: &Path, mean_key: &str, std_key: &str) -> Result<Option<Normalization>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(None) };
    let bad = |msg: String| Error::Model { path: path.to_path_buf(), msg };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let obj = if v.get(mean_key).is_some() { &v } else { v.get("pretrained_cfg").unwrap_or(&v) };
    let (Some(mean), Some(std)) = (obj.get(mean_key), obj.get(std_key)) else { return Ok(None) };
    let three = |key: &str, x: &serde_json::Value| -> Result<[f32; 3]> {
        let v: Vec<f32> = x.as_array().into_iter().flatten().filter_map(|e| e.as_f64()).map(|f| f as f32).collect();
        match v.as_slice() {
            [a, b, c] if v.iter().all(|x| x.is_finite()) => Ok([*a, *b, *c]),
            _ => Err(bad(format!("`{key}` must be three numbers (RGB), got {x}"))),
        }
    };
    let (mean, std) = (three(mean_key, mean)?, three(std_key, std)?);
    if std.iter().any(|&s| s <= 0.0) {
        return Err(bad(format!("`{std_key}` must be positive, got {std:?}")));
    }
    Ok(Some(Normalization::MeanStd { mean, std }))
}

/// The normalisation to train `backbone` with: `given` when set (a warning when the backbone records
/// another), else the recorded one (logged), else ImageNet's with a one-line warning naming the choice.
pub fn choose(backbone: &Path, given: Option<&Normalization>) -> Result<Normalization> {
    let rec = recorded(backbone)?;
    Ok(match (given, rec) {
        (Some(g), Some(r)) => {
            if *g != r.normalization {
                tracing::warn!(
                    "normalization {} overrides {} recorded in {}",
                    g.name(),
                    r.normalization.name(),
                    r.source
                );
            }
            g.clone()
        }
        (Some(g), None) => g.clone(),
        (None, Some(r)) => {
            tracing::info!("normalization: {} (from {})", r.normalization.name(), r.source);
            r.normalization
        }
        (None, None) => {
            let file = backbone.display();
            tracing::warn!(
                "normalization: imagenet mean/std (the default: {file} records none); pass --normalization \
                 symmetric|mean_std:R,G,B:R,G,B if the backbone was trained otherwise"
            );
            Normalization::imagenet()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timm_and_hugging_face_companions_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.json");
        std::fs::write(
            &cfg,
            r#"{"architecture": "x", "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}"#,
        )
        .unwrap();
        let n = companion(&cfg, "mean", "std").unwrap().unwrap();
        assert_eq!(n, Normalization::MeanStd { mean: [0.5; 3], std: [0.5; 3] });
        let hf = dir.path().join("preprocessor_config.json");
        std::fs::write(&hf, r#"{"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}"#).unwrap();
        assert_eq!(companion(&hf, "image_mean", "image_std").unwrap().unwrap(), Normalization::imagenet());
        std::fs::write(&cfg, r#"{"architecture": "x"}"#).unwrap();
        assert_eq!(companion(&cfg, "mean", "std").unwrap(), None);
        std::fs::write(&cfg, r#"{"mean": [0.5, 0.5], "std": [1, 1, 1]}"#).unwrap();
        let e = companion(&cfg, "mean", "std").unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("`mean` must be three numbers"), "{e}");
        assert_eq!(companion(&dir.path().join("missing.json"), "mean", "std").unwrap(), None);
    }
}
