//! The pictures a training run leaves in its model folder: the confusion matrix of the kept head on the
//! validation rows and the training curve (loss and validation metric per epoch), as SVG.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::metrics::Report;

/// Draws the confusion matrix (row-normalised colour, counts written in cells) as SVG.
pub fn confusion_svg(r: &Report, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let k = r.classes.len().max(1);
    let cell = 60u32;
    let margin = 160u32;
    let size = (margin + cell * k as u32 + 20, margin + cell * k as u32 + 20);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        let err = |e: String| Error::encode("the confusion matrix SVG", e);
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let style = ("sans-serif", 14).into_font();
        root.draw(&Text::new("confusion matrix (rows: true, cols: predicted)", (10, 10), style.clone()))
            .map_err(|e| err(e.to_string()))?;
        for (i, row) in r.confusion.iter().enumerate() {
            let total: usize = row.iter().sum();
            let y = (margin + cell * i as u32) as i32;
            root.draw(&Text::new(r.classes[i].clone(), (10, y + cell as i32 / 2), style.clone()))
                .map_err(|e| err(e.to_string()))?;
            for (j, &v) in row.iter().enumerate() {
                let x = (margin + cell * j as u32) as i32;
                let frac = if total == 0 { 0.0 } else { v as f64 / total as f64 };
                let shade = (255.0 * (1.0 - frac)) as u8;
                let colour = RGBColor(shade, shade, 255);
                root.draw(&Rectangle::new([(x, y), (x + cell as i32, y + cell as i32)], colour.filled()))
                    .map_err(|e| err(e.to_string()))?;
                let text_colour = if frac > 0.5 { WHITE } else { BLACK };
                root.draw(&Text::new(v.to_string(), (x + 8, y + cell as i32 / 2), style.clone().color(&text_colour)))
                    .map_err(|e| err(e.to_string()))?;
            }
        }
        for (j, c) in r.classes.iter().enumerate() {
            let x = (margin + cell * j as u32) as i32;
            let label: String = c.chars().take(8).collect();
            root.draw(&Text::new(label, (x + 4, margin as i32 - 20), style.clone())).map_err(|e| err(e.to_string()))?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    crate::util::fs::write_atomic(path, svg.as_bytes())
}

/// Draws training loss and the validation metric per epoch as SVG.
pub fn curve_svg(train_loss: &[f64], val_metric: &[f64], metric_name: &str, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let err = |e: String| Error::encode("the training curve SVG", e);
        let root = SVGBackend::with_string(&mut svg, (800, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let (left, right) = root.split_horizontally(400);
        let epochs = train_loss.len().max(1) as f64;
        let lmax = train_loss.iter().cloned().fold(0.0f64, f64::max).max(1e-9) * 1.05;
        let mut c = ChartBuilder::on(&left)
            .caption("training loss", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(1f64..epochs.max(2.0), 0f64..lmax)
            .map_err(|e| err(e.to_string()))?;
        c.configure_mesh().x_desc("epoch").draw().map_err(|e| err(e.to_string()))?;
        c.draw_series(LineSeries::new(train_loss.iter().enumerate().map(|(i, &v)| (i as f64 + 1.0, v)), &RED))
            .map_err(|e| err(e.to_string()))?;
        let mut c = ChartBuilder::on(&right)
            .caption(format!("validation {metric_name}"), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(1f64..epochs.max(2.0), 0f64..1.0)
            .map_err(|e| err(e.to_string()))?;
        c.configure_mesh().x_desc("epoch").draw().map_err(|e| err(e.to_string()))?;
        c.draw_series(LineSeries::new(val_metric.iter().enumerate().map(|(i, &v)| (i as f64 + 1.0, v)), &BLUE))
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    crate::util::fs::write_atomic(path, svg.as_bytes())
}
