//! A Triton model repository from a model folder, for Triton's ONNX Runtime backend:
//! `REPO/<name>/1/model.onnx` (the merged export), `REPO/<name>/labels.txt` (one class per line, the
//! classification extension's labels) and `REPO/<name>/config.pbtxt` (Triton's model configuration in
//! protobuf text format: platform, dynamic batch axis, input and outputs, dynamic batching, one instance).
//! Every file is written atomically; the export is verified first when asked.

use std::path::{Path, PathBuf};

use crate::deploy::export::{export, ExportOptions, ExportReport};
use crate::deploy::meta::ExportMeta;
use crate::error::{Error, Result};
use crate::onnx::read_model;
use crate::util::fs::write_atomic;

/// How the repository's model is configured.
#[derive(Debug, Clone)]
pub struct TritonOptions {
    /// The model's name in the repository (its folder).
    pub name: String,
    /// Triton's `max_batch_size`.
    pub max_batch_size: usize,
    /// Triton's `dynamic_batching.max_queue_delay_microseconds`.
    pub max_queue_delay_us: u64,
    /// `KIND_GPU` instead of `KIND_CPU`.
    pub gpu: bool,
}

/// A model name Triton and a file system both accept.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && name != "..";
    if !ok {
        return Err(Error::config("--model-name", format!("`{name}` must be letters, digits, `-`, `_` or `.`")));
    }
    Ok(())
}

/// Triton's `config.pbtxt` for an export described by `meta`.
pub fn config_pbtxt(meta: &ExportMeta, o: &TritonOptions) -> String {
    let s = meta.preprocess.size;
    let k = meta.classes.len();
    let output = |name: &str| {
        format!("  {{\n    name: \"{name}\"\n    data_type: TYPE_FP32\n    dims: [ {k} ]\n    label_filename: \"labels.txt\"\n  }}")
    };
    format!(
        "# Written by automm {version} for Triton's ONNX Runtime backend.\n\
         name: \"{name}\"\n\
         platform: \"onnxruntime_onnx\"\n\
         max_batch_size: {mbs}\n\
         input [\n  {{\n    name: \"{input}\"\n    data_type: TYPE_FP32\n    format: FORMAT_NCHW\n    dims: [ 3, {s}, {s} ]\n  }}\n]\n\
         output [\n{logits},\n{probs}\n]\n\
         dynamic_batching {{\n  max_queue_delay_microseconds: {delay}\n}}\n\
         instance_group [\n  {{\n    kind: {kind}\n    count: 1\n  }}\n]\n",
        version = meta.version,
        name = o.name,
        mbs = o.max_batch_size,
        input = meta.input,
        logits = output("logits"),
        probs = output("probabilities"),
        delay = o.max_queue_delay_us,
        kind = if o.gpu { "KIND_GPU" } else { "KIND_CPU" },
    )
}

/// Writes the repository entry for `model` (a model folder) under `repo`; returns the export's report
/// and the model's folder.
pub fn write_repository(
    model: &Path,
    repo: &Path,
    opts: &ExportOptions,
    triton: &TritonOptions,
) -> Result<(ExportReport, PathBuf)> {
    check_name(&triton.name)?;
    let dir = repo.join(&triton.name);
    let version = dir.join("1");
    std::fs::create_dir_all(&version).map_err(|e| Error::io(&version, e))?;
    let onnx = version.join("model.onnx");
    let report = export(model, &onnx, opts)?;
    let meta = ExportMeta::read(&read_model(&onnx)?, &onnx.display().to_string())?;
    let mut labels = meta.classes.join("\n");
    labels.push('\n');
    write_atomic(&dir.join("labels.txt"), labels.as_bytes())?;
    write_atomic(&dir.join("config.pbtxt"), config_pbtxt(&meta, triton).as_bytes())?;
    Ok((report, dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_escape_the_repository_are_refused() {
        for bad in ["", "..", "a/b", "x y"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        check_name("focal-v1.2_a").unwrap();
    }
}
