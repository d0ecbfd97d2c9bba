//! Export verification: the exported file is run (ONNX Runtime when found, else our candle importer) on a
//! few images of a table and compared with the model folder's own predictions on the candle engine.

use std::path::Path;

use candle_core::Device;
use serde::Serialize;

use crate::data::Table;
use crate::deploy::engine::exported::ExportedModel;
use crate::deploy::engine::ort::{Feed, OrtSession};
use crate::deploy::engine::EngineKind;
use crate::deploy::meta::{ExportKind, ExportMeta};
use crate::deploy::predict::Predictor;
use crate::error::{Error, Result};
use crate::onnx::{read_model, Graph};

/// Largest accepted |probability difference|.
pub const TOLERANCE: f32 = 1e-4;

/// Outcome of [`verify`].
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Whether every difference is within [`TOLERANCE`].
    pub passed: bool,
    /// max |p_export - p_model| over all images and classes.
    pub max_abs_diff: f32,
    /// The tolerance used.
    pub tolerance: f32,
    /// Images compared.
    pub images: usize,
    /// Whether every predicted label agrees.
    pub labels_equal: bool,
    /// Which engine ran the export.
    pub engine: EngineKind,
}

/// Compares `exported` with the model folder `model` on `n` images of `data` (default: the training table);
/// `backbone` says where the folder's backbone is when it moved since training.
pub fn verify(
    model: &Path,
    exported: &Path,
    data: Option<&Path>,
    n: usize,
    prior: Option<&crate::model::prior::PriorCorrection>,
    backbone: Option<&Path>,
) -> Result<Verification> {
    let mut predictor = Predictor::load_with_backbone(model, &Device::Cpu, backbone)?;
    if let Some(c) = prior {
        predictor.correct_prior(c)?;
    }
    let cfg = &predictor.config;
    let table_path = data.map(Path::to_path_buf).unwrap_or_else(|| cfg.train_data.clone());
    if !table_path.is_file() {
        return Err(Error::Model {
            path: model.to_path_buf(),
            msg: format!(
                "verification needs images: the training table {} is gone; pass --verify-data TABLE",
                table_path.display()
            ),
        });
    }
    let table = Table::load_with_hint(&table_path, None, &cfg.image_column)?;
    // Spread the picks over the table so several classes are likely covered.
    let step = (table.rows.len() / n.max(1)).max(1);
    let idx: Vec<usize> = (0..table.rows.len()).step_by(step).take(n.max(1)).collect();
    let table = table.subset(&idx)?;
    let files = table.all_image_refs();
    let want = predictor.predict_table(&table, true)?;
    let proto = read_model(exported)?;
    let meta = ExportMeta::read(&proto, &exported.display().to_string())?;
    let (got, engine) = if meta.kind == ExportKind::HeadOnly {
        let x = predictor.features(&table, true)?;
        let (rows, d) = x.dims2()?;
        let data: Vec<f32> = x.flatten_all()?.to_vec1()?;
        match crate::deploy::engine::ort::locate() {
            Ok(_) => {
                let s = OrtSession::open(exported, 0)?;
                let outs = s.run(vec![("features", Feed::F32(vec![rows, d], data))])?;
                let i = s.outputs.iter().position(|o| o == crate::deploy::meta::PROBABILITIES).unwrap_or(1);
                (outs.into_iter().nth(i).map(|o| o.1).unwrap_or_default(), EngineKind::Ort)
            }
            Err(_) => {
                let g = Graph::from_model(
                    &proto,
                    "head",
                    &Device::Cpu,
                    Some(vec![crate::deploy::meta::PROBABILITIES.into()]),
                )?;
                let y = g.run(&[("features", x)])?.remove(0);
                (y.flatten_all()?.to_vec1::<f32>()?, EngineKind::Candle)
            }
        }
    } else {
        let m = ExportedModel::open(exported, None, 0)?;
        (m.predict_files(&files, 8, true)?.probs, m.engine)
    };
    if got.len() != want.probs.len() {
        return Err(Error::Shape {
            name: "probabilities".into(),
            msg: format!("the export gave {} values, the model folder {}", got.len(), want.probs.len()),
        });
    }
    let max_abs_diff = got.iter().zip(&want.probs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let k = cfg.classes.len();
    let argmax = |row: &[f32]| {
        row.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32
    };
    let labels_equal = got.chunks(k).map(argmax).eq(want.preds.iter().copied());
    Ok(Verification {
        passed: max_abs_diff <= TOLERANCE && labels_equal,
        max_abs_diff,
        tolerance: TOLERANCE,
        images: files.len(),
        labels_equal,
        engine,
    })
}
