//! Reading a table of image paths and labels with polars, finding the image column, resolving paths
//! relative to the table's folder, and mapping labels to a sorted class list.

use std::path::{Path, PathBuf};

use polars::prelude::*;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::data::ImageRef;
use crate::error::{Error, Result};

/// Column names tried, in order, when `--image-column` is not given.
const IMAGE_COLUMN_NAMES: &[&str] = &["image", "image_path", "path", "filepath", "file", "img"];
const IMAGE_EXTENSIONS: &[&str] = &[".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"];

/// A table row: where its image is and, when the table has a label column, its label.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// 1-based data row number in the file (the header is row 0), for error messages.
    pub row: usize,
    /// The image path, resolved against the table's folder.
    pub image: PathBuf,
    /// The label as text (integer labels become their decimal text).
    pub label: Option<String>,
}

/// A loaded table.
#[derive(Debug, Clone)]
pub struct Table {
    /// The file it came from.
    pub path: PathBuf,
    /// The image column's name.
    pub image_column: String,
    /// The label column's name, when present.
    pub label_column: Option<String>,
    /// Rows in file order.
    pub rows: Vec<Row>,
    /// The whole frame, so predictions can copy the input columns.
    pub frame: DataFrame,
}

fn table_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Table { path: path.to_path_buf(), msg: msg.into() }
}

/// Reads a CSV or Parquet file (by extension; anything else is read as CSV).
pub fn read_frame(path: &Path) -> Result<DataFrame> {
    if !path.is_file() {
        return Err(table_err(path, "file not found"));
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    // polars can panic on malformed input; a panic is turned into an error naming the table.
    let read = std::panic::catch_unwind(|| read_frame_inner(path, &ext));
    read.unwrap_or_else(|p| {
        let why = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        Err(table_err(
            path,
            format!("the table reader failed on this file ({}); check its format", why.unwrap_or_default()),
        ))
    })
}

fn read_frame_inner(path: &Path, ext: &str) -> Result<DataFrame> {
    let df = if ext == "parquet" || ext == "pq" {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        ParquetReader::new(f).finish().map_err(|e| table_err(path, format!("not a readable Parquet file: {e}")))?
    } else {
        sniff_text(path)?;
        CsvReadOptions::default()
            .with_has_header(true)
            .with_infer_schema_length(Some(10_000))
            .try_into_reader_with_file_path(Some(path.to_path_buf()))
            .and_then(|r| r.finish())
            .map_err(|e| match ragged_row(path) {
                Some((row, found, want)) => table_err(
                    path,
                    format!("row {row} has {found} fields but the header has {want}; quote fields that contain commas"),
                ),
                None => table_err(path, format!("not a readable CSV file: {e}")),
            })?
    };
    Ok(df)
}

/// Refuses CSVs that are not UTF-8 text before polars sees them, with a message that says how to fix it
/// (polars would read a UTF-16 file as one garbled column).
fn sniff_text(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let head = &bytes[..bytes.len().min(4096)];
    let enc = if head.starts_with(&[0xff, 0xfe, 0, 0]) || head.starts_with(&[0, 0, 0xfe, 0xff]) {
        Some("UTF-32")
    } else if head.starts_with(&[0xff, 0xfe]) || head.starts_with(&[0xfe, 0xff]) {
        Some("UTF-16")
    } else {
        None
    };
    if let Some(enc) = enc {
        return Err(table_err(path, format!("the file is {enc} encoded; save it as UTF-8 CSV")));
    }
    if bytes.is_empty() {
        return Err(table_err(path, "the file is empty; expected a CSV header line and rows"));
    }
    if head.contains(&0) {
        return Err(table_err(
            path,
            "the file holds NUL bytes (binary data or UTF-16 without a byte-order mark); expected UTF-8 CSV text",
        ));
    }
    // The whole file, not just the head: polars' reader can panic on some invalid UTF-8 (found by fuzzing).
    if let Err(e) = std::str::from_utf8(&bytes) {
        let at = e.valid_up_to();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        return Err(table_err(
            path,
            format!(
                "line {line} (byte {at}) is not valid UTF-8 (e.g. Latin-1 or Windows-1252 text); save the table as UTF-8"
            ),
        ));
    }
    Ok(())
}

/// The first data row (1-based) whose field count differs from the header's, as (row, found, expected):
/// polars reports ragged lines without saying where. Quoted fields may hold commas and newlines.
fn ragged_row(path: &Path) -> Option<(usize, usize, usize)> {
    let bytes = std::fs::read(path).ok()?;
    let (mut in_quotes, mut fields, mut record, mut header) = (false, 1usize, 0usize, None);
    let mut blank = true;
    for &b in bytes.iter().chain(std::iter::once(&b'\n')) {
        match b {
            b'"' => {
                in_quotes = !in_quotes;
                blank = false;
            }
            b',' if !in_quotes => {
                fields += 1;
                blank = false;
            }
            b'\n' if !in_quotes => {
                if !blank {
                    match header {
                        None => header = Some(fields),
                        Some(h) if fields != h => return Some((record, fields, h)),
                        _ => {}
                    }
                    record += 1;
                }
                (fields, blank) = (1, true);
            }
            b'\r' => {}
            _ => blank = false,
        }
    }
    None
}

/// Column values as text (None for nulls), in row order.
fn column_text(df: &DataFrame, name: &str, path: &Path) -> Result<Vec<Option<String>>> {
    let col = df.column(name).map_err(|_| missing_column(df, name, path))?;
    let s = col
        .cast(&DataType::String)
        .map_err(|e| table_err(path, format!("column `{name}` cannot be read as text: {e}")))?;
    let ca = s.str().map_err(|e| table_err(path, format!("column `{name}`: {e}")))?;
    Ok(ca.iter().map(|v| v.map(str::to_string)).collect())
}

/// The label column as text. A float column (how CSV reading types integers once a cell is `NaN` or
/// `1.0`) must hold finite values, and integral ones are written as integers, so labels 0, 1, 2 stay
/// "0", "1", "2" instead of becoming "0.0", "1.0", ... plus a "NaN" class.
fn label_text(df: &DataFrame, name: &str, path: &Path) -> Result<Vec<Option<String>>> {
    let col = df.column(name).map_err(|_| missing_column(df, name, path))?;
    if !matches!(col.dtype(), DataType::Float32 | DataType::Float64) {
        return column_text(df, name, path);
    }
    let f = col.cast(&DataType::Float64).map_err(|e| table_err(path, format!("column `{name}`: {e}")))?;
    let values: Vec<Option<f64>> =
        f.f64().map_err(|e| table_err(path, format!("column `{name}`: {e}")))?.iter().collect();
    if let Some((i, v)) = values.iter().enumerate().find_map(|(i, v)| v.filter(|x| !x.is_finite()).map(|x| (i, x))) {
        return Err(table_err(path, format!("row {}: label column `{name}` is {v}; expected a class label", i + 1)));
    }
    let integral = values.iter().flatten().all(|x| x.fract() == 0.0 && x.abs() < 9.0e15);
    Ok(values.into_iter().map(|v| v.map(|x| if integral { format!("{}", x as i64) } else { format!("{x}") })).collect())
}

fn missing_column(df: &DataFrame, name: &str, path: &Path) -> Error {
    let present: Vec<String> = df.get_column_names().iter().map(|s| s.to_string()).collect();
    table_err(path, format!("no column `{name}`; the columns present are {present:?}"))
}

fn looks_like_image(s: &str) -> bool {
    let l = s.to_ascii_lowercase();
    IMAGE_EXTENSIONS.iter().any(|e| l.ends_with(e))
}

impl Table {
    /// Loads `path`. `label` names the label column (required for training data, optional for
    /// prediction); `image_column` overrides the image-column search.
    pub fn load(path: &Path, label: Option<&str>, image_column: Option<&str>) -> Result<Table> {
        Self::load_inner(path, label, image_column, None)
    }

    /// Like [`Table::load`] with the image column found automatically, trying `hint` first (the column a
    /// model was trained with), so a table that uses another name still works.
    pub fn load_with_hint(path: &Path, label: Option<&str>, hint: &str) -> Result<Table> {
        Self::load_inner(path, label, None, Some(hint))
    }

    fn load_inner(path: &Path, label: Option<&str>, image_column: Option<&str>, hint: Option<&str>) -> Result<Table> {
        let frame = read_frame(path)?;
        if frame.height() == 0 {
            return Err(table_err(path, "the table is empty (a header but no rows)"));
        }
        let label_column = match label {
            Some(l) => {
                frame.column(l).map_err(|_| missing_column(&frame, l, path))?;
                Some(l.to_string())
            }
            None => None,
        };
        let image_column = match image_column {
            Some(c) => {
                frame.column(c).map_err(|_| missing_column(&frame, c, path))?;
                c.to_string()
            }
            None => match hint.filter(|h| frame.column(h).is_ok() && Some(*h) != label) {
                Some(h) => h.to_string(),
                None => find_image_column(&frame, label_column.as_deref(), path)?,
            },
        };
        let images = column_text(&frame, &image_column, path)?;
        let labels = match &label_column {
            Some(l) => Some(label_text(&frame, l, path)?),
            None => None,
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let mut rows = Vec::with_capacity(images.len());
        for (i, img) in images.into_iter().enumerate() {
            let row = i + 1;
            let img = img.filter(|s| !s.trim().is_empty()).ok_or_else(|| {
                table_err(path, format!("row {row}: column `{image_column}` is empty; expected an image path"))
            })?;
            let p = Path::new(img.trim());
            let image = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
            let label = match &labels {
                Some(ls) => Some(ls[i].clone().filter(|s| !s.trim().is_empty()).ok_or_else(|| {
                    table_err(
                        path,
                        format!("row {row}: label column `{}` is empty", label_column.as_deref().unwrap_or("")),
                    )
                })?),
                None => None,
            };
            rows.push(Row { row, image, label });
        }
        Ok(Table { path: path.to_path_buf(), image_column, label_column, rows, frame })
    }

    /// The images of rows `idx` (indices into [`rows`](Self::rows)), with their table rows.
    pub fn image_refs(&self, idx: &[usize]) -> Vec<ImageRef> {
        idx.iter().map(|&i| ImageRef { path: self.rows[i].image.clone(), row: Some(self.rows[i].row) }).collect()
    }

    /// The images of every row.
    pub fn all_image_refs(&self) -> Vec<ImageRef> {
        self.image_refs(&(0..self.rows.len()).collect::<Vec<_>>())
    }

    /// Refuses an image named twice, here or in `other` (training data: a repeated image could land in
    /// both the training and the validation rows). Paths are compared as written, relative to the tables.
    pub fn check_distinct_images(&self, other: Option<&Table>) -> Result<()> {
        let mut seen: std::collections::HashMap<&Path, (&Path, usize)> = std::collections::HashMap::new();
        for t in std::iter::once(self).chain(other) {
            for r in &t.rows {
                if let Some((first, row)) = seen.insert(r.image.as_path(), (t.path.as_path(), r.row)) {
                    return Err(table_err(
                        &t.path,
                        format!(
                            "row {}: image {} is also row {row} of {}; each image may appear once in the training \
                             and tuning data",
                            r.row,
                            r.image.display(),
                            first.display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks every image file exists; the error names the first missing one's row and path.
    pub fn check_files(&self) -> Result<()> {
        for r in &self.rows {
            if !r.image.is_file() {
                return Err(Error::Image {
                    path: r.image.clone(),
                    row: Some(r.row),
                    msg: format!("file not found (listed in {}, column `{}`)", self.path.display(), self.image_column),
                });
            }
        }
        Ok(())
    }

    /// Checks that every image resolves (symlinks followed) to a file inside `root`: the gRPC `Fit`
    /// sandbox, so a table cannot make the server read files elsewhere. The error names the row.
    pub fn check_under(&self, root: &Path) -> Result<()> {
        let root = std::fs::canonicalize(root).map_err(|e| Error::io(root, e))?;
        for r in &self.rows {
            let inside = std::fs::canonicalize(&r.image).is_ok_and(|p| p.starts_with(&root));
            if !inside {
                return Err(table_err(
                    &self.path,
                    format!(
                        "row {}: image `{}` is not a file inside the data root {}",
                        r.row,
                        r.image.display(),
                        root.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Class indices of every row under `classes`; a label not in the list is an error naming the row.
    pub fn targets(&self, classes: &ClassList) -> Result<Vec<u32>> {
        self.rows
            .iter()
            .map(|r| {
                let l = r.label.as_deref().ok_or_else(|| table_err(&self.path, "the table has no label column"))?;
                classes.index_of(l).map(|i| i as u32).ok_or_else(|| {
                    table_err(
                        &self.path,
                        format!("row {}: label `{l}` is not a class of the training data {:?}", r.row, classes.names),
                    )
                })
            })
            .collect()
    }

    /// A table holding only `idx` rows (same columns).
    pub fn subset(&self, idx: &[usize]) -> Result<Table> {
        if let Some(&bad) = idx.iter().find(|&&i| i >= self.rows.len()) {
            return Err(table_err(&self.path, format!("row index {bad} is past the table's {} rows", self.rows.len())));
        }
        let rows = idx.iter().map(|&i| self.rows[i].clone()).collect();
        let ia = IdxCa::from_vec("idx".into(), idx.iter().map(|&i| i as IdxSize).collect());
        let frame = self.frame.take(&ia).map_err(|e| table_err(&self.path, e.to_string()))?;
        Ok(Table {
            path: self.path.clone(),
            image_column: self.image_column.clone(),
            label_column: self.label_column.clone(),
            rows,
            frame,
        })
    }
}

fn find_image_column(df: &DataFrame, label: Option<&str>, path: &Path) -> Result<String> {
    let names: Vec<String> = df.get_column_names().iter().map(|s| s.to_string()).collect();
    for want in IMAGE_COLUMN_NAMES {
        if let Some(n) = names.iter().find(|n| n.eq_ignore_ascii_case(want) && Some(n.as_str()) != label) {
            return Ok(n.clone());
        }
    }
    for n in &names {
        if Some(n.as_str()) == label {
            continue;
        }
        if let Ok(vals) = column_text(df, n, path) {
            if vals.iter().take(20).flatten().any(|v| looks_like_image(v)) {
                return Ok(n.clone());
            }
        }
    }
    Err(table_err(
        path,
        format!("no image column found (looked for {IMAGE_COLUMN_NAMES:?} or paths ending in an image extension); columns present: {names:?}; pass --image-column"),
    ))
}

/// The class list: sorted unique labels (numerically when every label is an integer), stored in the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassList {
    /// Class names in class-index order.
    pub names: Vec<String>,
}

impl ClassList {
    /// Sorted unique labels of `table`.
    pub fn from_table(table: &Table) -> Result<ClassList> {
        let mut names: Vec<String> = table.rows.iter().filter_map(|r| r.label.clone()).collect();
        if names.is_empty() {
            return Err(table_err(&table.path, "no labels: pass --label with the label column"));
        }
        names.sort();
        names.dedup();
        if names.iter().all(|n| n.trim().parse::<i64>().is_ok()) {
            names.sort_by_key(|n| n.trim().parse::<i64>().unwrap_or(0));
        }
        Ok(ClassList { names })
    }

    /// Index of a label.
    pub fn index_of(&self, label: &str) -> Option<usize> {
        self.names.iter().position(|n| n == label)
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when there are no classes.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Rows per class.
    pub fn counts(&self, targets: &[u32]) -> Vec<usize> {
        let mut c = vec![0; self.len()];
        for &t in targets {
            c[t as usize] += 1;
        }
        c
    }
}

/// AutoGluon's default holdout fraction for `n` training rows.
pub fn holdout_fraction(n: usize) -> f64 {
    let n = n as f64;
    if n < 5000.0 {
        (500.0 / n).clamp(0.1, 0.2)
    } else {
        (2500.0 / n).clamp(0.01, 0.1)
    }
}

/// A seeded stratified split of row indices into (train, holdout): each class gives
/// `round(fraction * n_c)` rows to the holdout but always keeps at least one in train.
pub fn stratified_split(targets: &[u32], num_classes: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for (i, &t) in targets.iter().enumerate() {
        by_class[t as usize].push(i);
    }
    let (mut train, mut hold) = (Vec::new(), Vec::new());
    for mut idx in by_class {
        idx.shuffle(&mut rng);
        let k = ((fraction * idx.len() as f64).round() as usize).min(idx.len().saturating_sub(1));
        hold.extend_from_slice(&idx[..k]);
        train.extend_from_slice(&idx[k..]);
    }
    train.sort_unstable();
    hold.sort_unstable();
    (train, hold)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_column_hint_wins_when_present_else_detection() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        std::fs::write(&p, "path,photo,label\na.png,b.png,x\n").unwrap();
        assert_eq!(Table::load(&p, None, None).unwrap().image_column, "path");
        assert_eq!(Table::load_with_hint(&p, None, "photo").unwrap().rows[0].image, dir.path().join("b.png"));
        assert_eq!(Table::load_with_hint(&p, None, "missing").unwrap().image_column, "path");
        assert!(Table::load(&p, None, Some("missing")).unwrap_err().to_string().contains("\"photo\""));
    }

    #[test]
    fn float_label_columns_stay_integers_and_nan_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        std::fs::write(&p, "image,label\na.png,0\nb.png,1.0\nc.png,2\n").unwrap();
        let t = Table::load(&p, Some("label"), Some("image")).unwrap();
        assert_eq!(t.rows.iter().map(|r| r.label.clone().unwrap()).collect::<Vec<_>>(), ["0", "1", "2"]);
        std::fs::write(&p, "image,label\na.png,0\nb.png,NaN\nc.png,2\n").unwrap();
        let e = Table::load(&p, Some("label"), Some("image")).unwrap_err().to_string();
        assert!(e.contains("row 2") && e.contains("NaN") && e.contains("t.csv"), "{e}");
        std::fs::write(&p, "image,label\na.png,0.5\nb.png,1\n").unwrap();
        let t = Table::load(&p, Some("label"), Some("image")).unwrap();
        assert_eq!(t.rows[0].label.as_deref(), Some("0.5"));
    }

    #[test]
    fn an_image_named_twice_is_refused_naming_both_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        std::fs::write(&p, "image,label\na.png,x\nb.png,y\na.png,y\n").unwrap();
        let t = Table::load(&p, Some("label"), Some("image")).unwrap();
        let e = t.check_distinct_images(None).unwrap_err().to_string();
        assert!(e.contains("row 3") && e.contains("row 1") && e.contains("a.png"), "{e}");
        let q = dir.path().join("v.csv");
        std::fs::write(&q, "image,label\nc.png,x\nb.png,y\n").unwrap();
        std::fs::write(&p, "image,label\na.png,x\nb.png,y\n").unwrap();
        let (t, v) = (Table::load(&p, Some("label"), None).unwrap(), Table::load(&q, Some("label"), None).unwrap());
        let e = t.check_distinct_images(Some(&v)).unwrap_err().to_string();
        assert!(e.contains("v.csv") && e.contains("row 2") && e.contains("b.png"), "{e}");
    }

    #[test]
    fn holdout_rule_matches_autogluon() {
        assert_eq!(holdout_fraction(100), 0.2);
        assert!((holdout_fraction(4000) - 0.125).abs() < 1e-12);
        assert!((holdout_fraction(4999) - 500.0 / 4999.0).abs() < 1e-12);
        assert_eq!(holdout_fraction(6000), 0.1);
        assert_eq!(holdout_fraction(100_000), 0.025);
    }

    #[test]
    fn split_is_stratified_and_keeps_a_train_row_per_class() {
        let targets: Vec<u32> = [vec![0; 200], vec![1; 66], vec![2; 22], vec![3; 1]].concat();
        let (tr, ho) = stratified_split(&targets, 4, 0.2, 7);
        assert_eq!(tr.len() + ho.len(), targets.len());
        let count = |ix: &[usize], c: u32| ix.iter().filter(|&&i| targets[i] == c).count();
        assert_eq!(count(&ho, 0), 40);
        assert_eq!(count(&ho, 3), 0);
        assert_eq!(count(&tr, 3), 1);
        assert_eq!(stratified_split(&targets, 4, 0.2, 7), (tr, ho));
    }
}
