//! Prediction and evaluation with a trained model folder: images -> backbone features -> head ->
//! probabilities, written as a CSV (input columns, `predicted_label`, one `prob_<class>` per class) or
//! scored with [`crate::model::metrics`].

use std::path::Path;

use candle_core::Device;
use polars::prelude::*;

use crate::data::Table;
use crate::error::{Error, Result};
use crate::model::metrics::{self, Report};
use crate::model::{Backbone, Predictions};
use crate::model::{Head, ModelConfig, ModelDir};

/// A loaded model folder ready to predict on the candle engine.
pub struct Predictor {
    /// Its config.
    pub config: ModelConfig,
    backbone: Backbone,
    head: Head,
    /// Images per backbone batch.
    pub batch_size: usize,
}

impl Predictor {
    /// Loads a model folder; the backbone is read from where it was at training time (its sha256 is checked).
    pub fn load(dir: &Path, device: &Device) -> Result<Predictor> {
        Self::load_with_backbone(dir, device, None)
    }

    /// [`load`](Self::load) with the backbone read from `backbone` when given (it moved since training;
    /// its sha256 must still be the recorded one).
    pub fn load_with_backbone(dir: &Path, device: &Device, backbone: Option<&Path>) -> Result<Predictor> {
        let md = ModelDir::new(dir);
        let config = md.read_config_with_backbone(backbone)?;
        let bpath = &config.backbone.path;
        let mut backbone = Backbone::load(
            bpath,
            device,
            Some(&config.backbone.feature_tensor),
            config.preprocess.normalization.clone(),
        )?;
        backbone.apply_update(&md.read_backbone_update(&config, device)?)?;
        let head = Head::load(&md.head(), config.classes.len(), config.backbone.feature_dim, device)?;
        Ok(Predictor { config, backbone, head, batch_size: 8 })
    }

    /// Applies a post-hoc prior correction to every later prediction.
    pub fn correct_prior(&mut self, c: &crate::model::prior::PriorCorrection) -> Result<()> {
        self.head = self.head.shifted(&c.shift(&self.config.classes, &self.config.class_counts)?)?;
        Ok(())
    }

    /// Backbone features `[N, D]` of every row of `table`.
    pub fn features(&self, table: &Table, quiet: bool) -> Result<candle_core::Tensor> {
        table.check_files()?;
        self.backbone.features_of_files(&table.all_image_refs(), self.batch_size, "predict", quiet)
    }

    /// Predicts every row of `table`.
    pub fn predict_table(&self, table: &Table, quiet: bool) -> Result<Predictions> {
        let x = self.features(table, quiet)?;
        self.head.predict(&x)
    }

    /// Scores `table` (which must have the label column).
    pub fn evaluate(&self, table: &Table, quiet: bool) -> Result<Report> {
        let p = self.predict_table(table, quiet)?;
        self.score(table, &p)
    }

    /// Scores predictions `p` already made for `table` against its label column.
    pub fn score(&self, table: &Table, p: &Predictions) -> Result<Report> {
        let classes = crate::data::ClassList { names: self.config.classes.clone() };
        let truth = table.targets(&classes)?;
        metrics::compute(&truth, &p.preds, Some(&p.probs), &self.config.classes)
    }
}

/// Writes predictions as CSV: the table's columns, `predicted_label`, then `prob_<class>` per class.
pub fn write_predictions(table: &Table, classes: &[String], p: &Predictions, out: &Path) -> Result<()> {
    let k = classes.len();
    let mut df = table.frame.clone();
    let labels: Vec<String> = p.preds.iter().map(|&i| classes[i as usize].clone()).collect();
    let err = |e: PolarsError| Error::Table { path: out.to_path_buf(), msg: e.to_string() };
    df.with_column(Column::new("predicted_label".into(), labels)).map_err(err)?;
    for (c, name) in classes.iter().enumerate() {
        let col: Vec<f32> = (0..p.preds.len()).map(|i| p.probs[i * k + c]).collect();
        df.with_column(Column::new(format!("prob_{name}").into(), col)).map_err(err)?;
    }
    let mut buf = Vec::new();
    CsvWriter::new(&mut buf).include_header(true).finish(&mut df).map_err(err)?;
    crate::util::fs::write_atomic(out, &buf)
}
