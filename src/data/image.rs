//! Image decoding and preprocessing: decode with `image` (bounded by limits), resize the shorter side to
//! the backbone's input size, center-crop, normalise, and lay out as CHW float32; batches are decoded in
//! parallel on all cores.

use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, ImageReader, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest image accepted, in pixels per side (decompression bombs are refused before allocation).
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Largest decoder allocation accepted.
pub const MAX_IMAGE_ALLOC: u64 = 512 * 1024 * 1024;
/// Images up to this aspect ratio are resized whole before the centre crop; longer ones only around
/// the part the crop keeps ([`Preprocess::resize_crop`]).
pub const MAX_WHOLE_ASPECT: u32 = 4;

/// How pixel values are normalised after scaling to [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Normalization {
    /// `(x/255 - mean) / std` per channel (ImageNet: mean 0.485,0.456,0.406, std 0.229,0.224,0.225).
    MeanStd {
        /// Per-channel mean (RGB).
        mean: [f32; 3],
        /// Per-channel standard deviation (RGB).
        std: [f32; 3],
    },
    /// `x/255*2 - 1` (EfficientNet-Lite, Inception style).
    Symmetric,
}

impl Normalization {
    /// The name `parse` reads back: `imagenet`, `symmetric` or `mean_std:m0,m1,m2:s0,s1,s2`.
    pub fn name(&self) -> String {
        match self {
            n if *n == Self::imagenet() => "imagenet".into(),
            Normalization::Symmetric => "symmetric".into(),
            Normalization::MeanStd { mean: m, std: s } => {
                format!("mean_std:{},{},{}:{},{},{}", m[0], m[1], m[2], s[0], s[1], s[2])
            }
        }
    }

    /// ImageNet mean/std, timm's default.
    pub fn imagenet() -> Self {
        Normalization::MeanStd { mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] }
    }

    /// Parses `imagenet`, `symmetric` (alias `inception`, `minus_one_one`) or `mean_std:m0,m1,m2:s0,s1,s2`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "imagenet" => Ok(Self::imagenet()),
            "symmetric" | "inception" | "minus_one_one" | "efficientnet_lite" => Ok(Normalization::Symmetric),
            _ => {
                let parts: Vec<&str> = s.split(':').collect();
                let three = |p: &str| -> Option<[f32; 3]> {
                    let v: Vec<f32> = p.split(',').filter_map(|x| x.trim().parse().ok()).collect();
                    (v.len() == 3).then(|| [v[0], v[1], v[2]])
                };
                if parts.len() == 3 && parts[0] == "mean_std" {
                    if let (Some(mean), Some(std)) = (three(parts[1]), three(parts[2])) {
                        if std.iter().all(|&x| x > 0.0) {
                            return Ok(Normalization::MeanStd { mean, std });
                        }
                    }
                }
                Err(Error::config(
                    "--normalization",
                    format!(
                        "unknown normalization `{s}`; expected imagenet, symmetric (x/255*2-1) or mean_std:R,G,B:R,G,B"
                    ),
                ))
            }
        }
    }

    /// Per-channel (scale, offset) so that `y = x_u8 * scale + offset`.
    pub fn affine(&self) -> [(f32, f32); 3] {
        match self {
            Normalization::MeanStd { mean, std } => [0, 1, 2].map(|c| (1.0 / (255.0 * std[c]), -mean[c] / std[c])),
            Normalization::Symmetric => [(2.0 / 255.0, -1.0); 3],
        }
    }
}

/// The preprocessing a backbone expects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Square input side (e.g. 224).
    pub size: u32,
    /// The shorter side is resized to this before the center crop (equal to `size` by default).
    pub resize_shorter: u32,
    /// Pixel normalisation.
    pub normalization: Normalization,
}

impl Preprocess {
    /// Resize the shorter side to `size`, center-crop `size`, normalise.
    pub fn new(size: u32, normalization: Normalization) -> Self {
        Preprocess { size, resize_shorter: size, normalization }
    }

    /// Floats per preprocessed image (3 * size * size).
    pub fn numel(&self) -> usize {
        3 * (self.size as usize) * (self.size as usize)
    }

    /// For an image longer than [`MAX_WHOLE_ASPECT`] times its shorter side, only the centre the crop
    /// keeps (plus the resampling filter's reach) is resized: a 16384x1 image would otherwise become a
    /// 3,670,016x224 one (seconds of CPU and gigabytes) just to keep 224 columns of it. Other images pass
    /// unchanged, so their preprocessing is exactly as before.
    fn keep_centre(&self, rgb: RgbImage) -> RgbImage {
        let (w, h) = rgb.dimensions();
        let (short, long) = (w.min(h).max(1), w.max(h));
        if long <= MAX_WHOLE_ASPECT * short {
            return rgb;
        }
        // The crop keeps `size` resized pixels of the long side: size * short / resize_shorter source
        // pixels; the triangle filter reaches max(1, short / resize_shorter) source pixels each way.
        let per = short as f64 / self.resize_shorter.max(1) as f64;
        let keep = (self.size as f64 * per).ceil() as u32 + 2 * (per.ceil() as u32 + 2);
        let keep = keep.min(long);
        let start = (long - keep) / 2;
        let (x0, y0, cw, ch) = if w > h { (start, 0, keep, h) } else { (0, start, w, keep) };
        image::imageops::crop_imm(&rgb, x0, y0, cw, ch).to_image()
    }

    /// Resizes and crops a decoded image to `size` x `size` RGB.
    pub fn resize_crop(&self, img: &DynamicImage) -> RgbImage {
        let rgb = self.keep_centre(img.to_rgb8());
        let (w, h) = rgb.dimensions();
        let s = self.resize_shorter as f64;
        let (nw, nh) = if w <= h {
            (self.resize_shorter, ((h as f64) * s / w as f64).round().max(1.0) as u32)
        } else {
            (((w as f64) * s / h as f64).round().max(1.0) as u32, self.resize_shorter)
        };
        let resized =
            if (nw, nh) == (w, h) { rgb } else { image::imageops::resize(&rgb, nw, nh, FilterType::Triangle) };
        let x0 = (nw.saturating_sub(self.size)) / 2;
        let y0 = (nh.saturating_sub(self.size)) / 2;
        image::imageops::crop_imm(&resized, x0, y0, self.size.min(nw), self.size.min(nh)).to_image()
    }

    /// Normalises an RGB image of `size` x `size` into CHW floats appended to `out`.
    pub fn to_chw(&self, rgb: &RgbImage, out: &mut Vec<f32>) {
        let aff = self.normalization.affine();
        let (w, h) = rgb.dimensions();
        let plane = (w * h) as usize;
        let start = out.len();
        out.resize(start + 3 * plane, 0.0);
        let raw = rgb.as_raw();
        for c in 0..3 {
            let (scale, off) = aff[c];
            let dst = &mut out[start + c * plane..start + (c + 1) * plane];
            for (i, d) in dst.iter_mut().enumerate() {
                *d = raw[i * 3 + c] as f32 * scale + off;
            }
        }
    }

    /// Decodes bytes (any supported format) and preprocesses them into CHW floats.
    pub fn bytes_to_chw(&self, bytes: &[u8], what: &Path) -> Result<Vec<f32>> {
        let img = decode_bytes(bytes, what, None)?;
        let mut v = Vec::with_capacity(self.numel());
        self.to_chw(&self.resize_crop(&img), &mut v);
        Ok(v)
    }

    /// Reads, decodes and preprocesses one file. `row` is for the error message.
    pub fn file_to_chw(&self, path: &Path, row: Option<usize>) -> Result<Vec<f32>> {
        let img = ImageRef { path: path.to_path_buf(), row }.decode()?;
        let mut v = Vec::with_capacity(self.numel());
        self.to_chw(&self.resize_crop(&img), &mut v);
        Ok(v)
    }

    /// Preprocesses many files in parallel; the result is `[N, 3, size, size]` flattened, in order.
    pub fn files_to_batch(&self, files: &[ImageRef]) -> Result<Vec<f32>> {
        let parts: Result<Vec<Vec<f32>>> = files.par_iter().map(|f| self.file_to_chw(&f.path, f.row)).collect();
        Ok(parts?.concat())
    }
}

/// An image file and the 1-based data row of the table that named it (for error messages), when it
/// came from a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// The file.
    pub path: std::path::PathBuf,
    /// Its table row, when known.
    pub row: Option<usize>,
}

impl ImageRef {
    /// Reads and decodes the file (under the decoder limits); errors name the file and row.
    pub fn decode(&self) -> Result<DynamicImage> {
        let bytes = std::fs::read(&self.path).map_err(|e| Error::Image {
            path: self.path.clone(),
            row: self.row,
            msg: format!("cannot read: {e}"),
        })?;
        decode_bytes(&bytes, &self.path, self.row)
    }
}

/// True when a JPEG's last scan (SOS, `FF DA`) is followed by an end-of-image marker (`FF D9`). The
/// decoder fills a cut-off scan with grey and reports success, so without this a truncated file would
/// train and predict silently. Inside entropy-coded data a 0xFF byte is always stuffed (`FF 00`) or a
/// restart marker, so `FF D9` there is the real end.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xff, 0xda]);
    last_scan.is_some_and(|i| bytes[i..].windows(2).any(|w| w == [0xff, 0xd9]))
}

/// Decodes bytes with the format guessed from content, under [`MAX_IMAGE_SIDE`] / [`MAX_IMAGE_ALLOC`].
pub fn decode_bytes(bytes: &[u8], what: &Path, row: Option<usize>) -> Result<DynamicImage> {
    let err = |msg: String| Error::Image { path: what.to_path_buf(), row, msg };
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(format!("cannot read: {e}")))?;
    match reader.format() {
        None => return Err(err("not a recognised image (expected JPEG or PNG bytes)".into())),
        Some(image::ImageFormat::Jpeg) if !jpeg_is_complete(bytes) => {
            return Err(err("truncated JPEG: no end-of-image marker after the last scan".into()))
        }
        _ => {}
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    reader.limits(limits);
    reader.decode().map_err(|e| err(format!("cannot decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_jpegs_are_refused_complete_ones_decode() {
        let img = RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 90]));
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
        let jpeg = buf.into_inner();
        assert!(decode_bytes(&jpeg, Path::new("ok.jpg"), None).is_ok());
        let mut trailing = jpeg.clone();
        trailing.extend_from_slice(b"appended bytes after the image");
        assert!(decode_bytes(&trailing, Path::new("trailing.jpg"), None).is_ok());
        for cut in [jpeg.len() - 2, jpeg.len() * 2 / 3, jpeg.len() / 2] {
            let e = decode_bytes(&jpeg[..cut], Path::new("cut.jpg"), Some(3)).unwrap_err().to_string();
            assert!(e.contains("cut.jpg") && e.contains("row 3") && e.contains("truncated JPEG"), "{cut}: {e}");
        }
    }

    /// A 16384x1 image (an aspect-ratio bomb) costs no more than a square one, and an image with an
    /// extreme but not absurd aspect keeps the same centre as resizing it whole.
    #[test]
    fn extreme_aspect_ratios_resize_only_what_the_crop_keeps() {
        let pp = Preprocess::new(224, Normalization::Symmetric);
        let t0 = std::time::Instant::now();
        let out = pp.resize_crop(&DynamicImage::ImageRgb8(RgbImage::from_pixel(16384, 1, image::Rgb([9, 99, 199]))));
        assert_eq!(out.dimensions(), (224, 224));
        assert!(out.pixels().all(|p| p.0 == [9, 99, 199]));
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "took {:?}", t0.elapsed());
        // 400x40 (10:1), a gradient along x: the kept centre matches resizing the whole image to 1 level.
        let img = RgbImage::from_fn(400, 40, |x, _| image::Rgb([(x % 256) as u8, (x / 2) as u8, 7]));
        let pp = Preprocess::new(32, Normalization::Symmetric);
        let fast = pp.resize_crop(&DynamicImage::ImageRgb8(img.clone()));
        let whole = image::imageops::resize(&img, 320, 32, FilterType::Triangle);
        let whole = image::imageops::crop_imm(&whole, 144, 0, 32, 32).to_image();
        let worst =
            fast.pixels().zip(whole.pixels()).flat_map(|(a, b)| (0..3).map(move |c| a.0[c].abs_diff(b.0[c]))).max();
        assert!(worst.unwrap_or(0) <= 1, "centre differs by {worst:?} levels");
    }

    #[test]
    fn resize_crop_keeps_aspect_and_centers() {
        // 40x20 image: left half red, right half blue; a 10x10 crop of the 20x10 resize is the middle.
        let mut img = RgbImage::new(40, 20);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = if x < 20 { image::Rgb([255, 0, 0]) } else { image::Rgb([0, 0, 255]) };
        }
        let pp = Preprocess::new(10, Normalization::Symmetric);
        let out = pp.resize_crop(&DynamicImage::ImageRgb8(img));
        assert_eq!(out.dimensions(), (10, 10));
        assert_eq!(out.get_pixel(0, 5)[0], 255);
        assert_eq!(out.get_pixel(9, 5)[2], 255);
        let mut v = Vec::new();
        pp.to_chw(&out, &mut v);
        assert_eq!(v.len(), 300);
        assert!((v[0] - 1.0).abs() < 1e-6); // red channel at (0,0): 255 -> 1
        assert!((v[100] + 1.0).abs() < 1e-6); // green 0 -> -1
    }

    #[test]
    fn imagenet_normalisation_formula() {
        let n = Normalization::imagenet();
        let (s, o) = n.affine()[0];
        assert!((128.0 * s + o - (128.0 / 255.0 - 0.485) / 0.229).abs() < 1e-5);
        assert!(Normalization::parse("bogus").unwrap_err().to_string().contains("imagenet"));
        assert_eq!(Normalization::parse("mean_std:0.5,0.5,0.5:0.5,0.5,0.5").unwrap().affine()[1], (2.0 / 255.0, -1.0));
    }

    #[test]
    fn garbage_bytes_name_the_file() {
        let e = decode_bytes(b"not an image", Path::new("x.jpg"), Some(3)).unwrap_err().to_string();
        assert!(e.contains("x.jpg") && e.contains("row 3"), "{e}");
    }
}
