//! The pictures a training run leaves in its model folder: the confusion matrix of the kept head on the
//! validation rows and the training curve (loss and validation metric per epoch), as SVG.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::metrics::Report;

/// Draws the confusion matrix of `split` (row-normalised colour, counts written in cells) as SVG.
pub fn confusion_svg(r: &Report, split: &str, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let k = r.classes.len().max(1);
    let cell = 60u32;
    let margin = 160u32;
    let size = (margin + cell * k as u32 + 40, margin + cell * k as u32 + 40);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        let err = |e: String| Error::encode("the confusion matrix SVG", e);
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let style = ("sans-serif", 14).into_font();
        let title = format!("confusion matrix, {split} ({} images)", r.support.iter().sum::<usize>());
        root.draw(&Text::new(title, (10, 10), style.clone())).map_err(|e| err(e.to_string()))?;
        let legend = "rows: true class, columns: predicted; shade: share of the row";
        root.draw(&Text::new(legend, (10, 32), style.clone())).map_err(|e| err(e.to_string()))?;
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

type Area<'a> = plotters::drawing::DrawingArea<plotters::backend::SVGBackend<'a>, plotters::coord::Shift>;

/// One panel of the training curve: `values` per epoch (integer epoch ticks), the kept epoch marked.
fn curve_panel(
    area: &Area,
    title: &str,
    y_desc: &str,
    values: &[f64],
    y_max: f64,
    colour: plotters::style::RGBColor,
    best: usize,
) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: String| Error::encode("the training curve SVG", e);
    let last = values.len().max(2) as i32;
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .margin_right(25)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(1i32..last, 0f64..y_max)
        .map_err(|e| err(e.to_string()))?;
    c.configure_mesh()
        .x_desc("epoch")
        .y_desc(y_desc)
        .x_labels(values.len().clamp(2, 20))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let points = values.iter().enumerate().map(|(i, &v)| (i as i32 + 1, v));
    c.draw_series(LineSeries::new(points, &colour)).map_err(|e| err(e.to_string()))?;
    if let Some(&v) = best.checked_sub(1).and_then(|i| values.get(i)) {
        let mark = Circle::new((best as i32, v), 5, colour.filled());
        c.draw_series(std::iter::once(mark)).map_err(|e| err(e.to_string()))?;
        let note = format!("kept: epoch {best} ({v:.3})");
        let pos = c.backend_coord(&(best as i32, v));
        let y = if pos.1 > 200 { pos.1 - 24 } else { pos.1 + 12 };
        area.draw(&Text::new(note, (pos.0.min(240) - 30, y), ("sans-serif", 13).into_font()))
            .map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

/// Draws training loss and the validation metric per epoch as SVG, the kept epoch (`best`, 1-based) marked.
pub fn curve_svg(train_loss: &[f64], val_metric: &[f64], metric_name: &str, best: usize, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let err = |e: String| Error::encode("the training curve SVG", e);
        let root = SVGBackend::with_string(&mut svg, (860, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let (left, right) = root.split_horizontally(430);
        let lmax = train_loss.iter().cloned().filter(|v| v.is_finite()).fold(0.0f64, f64::max).max(1e-9) * 1.05;
        curve_panel(&left, "training loss", "loss (mean over steps)", train_loss, lmax, RED, best)?;
        let title = format!("validation {metric_name}");
        curve_panel(&right, &title, metric_name, val_metric, 1.0, BLUE, best)?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    crate::util::fs::write_atomic(path, svg.as_bytes())
}
