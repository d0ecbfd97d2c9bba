//! Seeded training-time augmentation (`model.timm_image.train_transforms`): random resized crop,
//! horizontal flip and colour jitter, the torchvision/timm transforms AutoMM lists. Each image draws from
//! its own ChaCha8 stream (run seed, epoch, sample), so a run is reproducible whatever the thread count.

use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::image::{ImageRef, Preprocess};
use crate::error::Result;

crate::named_enum! {
    /// A training-time image transform (timm/torchvision names as AutoMM spells them).
    pub enum Transform("transform") {
        /// `random_resize_crop`: a crop of 8-100% of the area, aspect 3/4-4/3, resized to the input size.
        RandomResizeCrop = "random_resize_crop" | "random_resized_crop",
        /// `random_horizontal_flip`: mirror with probability 0.5.
        RandomHorizontalFlip = "random_horizontal_flip",
        /// `color_jitter`: brightness, contrast and saturation each scaled by a factor in [0.6, 1.4].
        ColorJitter = "color_jitter",
    }
}

/// The seed of sample `index` in `epoch` of a run seeded `seed`.
pub fn sample_seed(seed: u64, epoch: usize, index: usize) -> u64 {
    // SplitMix64-style mixing so neighbouring (epoch, index) pairs get unrelated streams.
    let mut z =
        seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (index as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Applies `transforms` to a decoded image and returns a `size` x `size` RGB image.
pub fn augment(pre: &Preprocess, img: &DynamicImage, transforms: &[Transform], seed: u64) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let s = pre.size;
    let mut out = if transforms.contains(&Transform::RandomResizeCrop) {
        random_resized_crop(&img.to_rgb8(), s, &mut rng)
    } else {
        pre.resize_crop(img)
    };
    if transforms.contains(&Transform::RandomHorizontalFlip) && rng.random_bool(0.5) {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    if transforms.contains(&Transform::ColorJitter) {
        color_jitter(&mut out, &mut rng);
    }
    out
}

/// torchvision's RandomResizedCrop: area 8-100% of the image, aspect ratio log-uniform in [3/4, 4/3],
/// ten tries, else the largest central crop of a valid ratio.
fn random_resized_crop(img: &RgbImage, size: u32, rng: &mut ChaCha8Rng) -> RgbImage {
    let (w, h) = img.dimensions();
    let area = (w as f64) * (h as f64);
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(0.08..=1.0);
        let ratio = rng.random_range(lo..=hi).exp();
        let cw = (target * ratio).sqrt().round() as u32;
        let ch = (target / ratio).sqrt().round() as u32;
        if cw >= 1 && ch >= 1 && cw <= w && ch <= h {
            let x0 = rng.random_range(0..=w - cw);
            let y0 = rng.random_range(0..=h - ch);
            let crop = image::imageops::crop_imm(img, x0, y0, cw, ch).to_image();
            return image::imageops::resize(&crop, size, size, FilterType::Triangle);
        }
    }
    let side = w.min(h);
    let crop = image::imageops::crop_imm(img, (w - side) / 2, (h - side) / 2, side, side).to_image();
    image::imageops::resize(&crop, size, size, FilterType::Triangle)
}

/// Brightness, contrast and saturation, each scaled by a factor drawn from [0.6, 1.4] (torchvision's
/// ColorJitter(0.4, 0.4, 0.4)), applied in that order.
fn color_jitter(img: &mut RgbImage, rng: &mut ChaCha8Rng) {
    let b: f32 = rng.random_range(0.6..=1.4);
    let c: f32 = rng.random_range(0.6..=1.4);
    let s: f32 = rng.random_range(0.6..=1.4);
    let gray = |p: &[f32; 3]| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
    let mut px: Vec<[f32; 3]> = img.pixels().map(|p| [p[0] as f32 * b, p[1] as f32 * b, p[2] as f32 * b]).collect();
    for p in px.iter_mut() {
        for v in p.iter_mut() {
            *v = v.clamp(0.0, 255.0);
        }
    }
    let mean = px.iter().map(gray).sum::<f32>() / px.len().max(1) as f32;
    for p in px.iter_mut() {
        for v in p.iter_mut() {
            *v = ((*v - mean) * c + mean).clamp(0.0, 255.0);
        }
        let g = gray(p);
        for v in p.iter_mut() {
            *v = ((*v - g) * s + g).clamp(0.0, 255.0);
        }
    }
    for (dst, p) in img.pixels_mut().zip(px) {
        *dst = image::Rgb([p[0].round() as u8, p[1].round() as u8, p[2].round() as u8]);
    }
}

/// Reads, decodes, augments and normalises files in parallel into `[N, 3, S, S]` (flattened, in order);
/// `seeds[i]` drives file i's transforms.
pub fn files_to_batch(
    pre: &Preprocess,
    files: &[ImageRef],
    transforms: &[Transform],
    seeds: &[u64],
) -> Result<Vec<f32>> {
    let parts: Result<Vec<Vec<f32>>> = files
        .par_iter()
        .zip(seeds)
        .map(|(f, &seed)| {
            let img = f.decode()?;
            let mut v = Vec::with_capacity(pre.numel());
            pre.to_chw(&augment(pre, &img, transforms, seed), &mut v);
            Ok(v)
        })
        .collect();
    Ok(parts?.concat())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Normalization;

    fn test_image() -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, 128])))
    }

    #[test]
    fn same_seed_same_image_and_seeds_differ() {
        let pre = Preprocess::new(32, Normalization::imagenet());
        let all = [Transform::RandomResizeCrop, Transform::RandomHorizontalFlip, Transform::ColorJitter];
        let a = augment(&pre, &test_image(), &all, 7);
        let b = augment(&pre, &test_image(), &all, 7);
        assert_eq!(a, b);
        assert_eq!(a.dimensions(), (32, 32));
        let differ = (0..8).filter(|&i| augment(&pre, &test_image(), &all, sample_seed(1, 0, i)) != a).count();
        assert!(differ >= 7, "only {differ} of 8 seeds changed the image");
        assert_ne!(sample_seed(1, 0, 1), sample_seed(1, 1, 0));
    }

    #[test]
    fn no_transforms_is_the_plain_preprocessing_and_flip_mirrors() {
        let pre = Preprocess::new(32, Normalization::imagenet());
        let img = test_image();
        assert_eq!(augment(&pre, &img, &[], 3), pre.resize_crop(&img));
        // Some seed flips: then the image is the mirror of the plain one.
        let plain = pre.resize_crop(&img);
        let mut mirrored = plain.clone();
        image::imageops::flip_horizontal_in_place(&mut mirrored);
        let outs: Vec<RgbImage> = (0..16).map(|s| augment(&pre, &img, &[Transform::RandomHorizontalFlip], s)).collect();
        assert!(outs.contains(&mirrored) && outs.contains(&plain));
        assert!(outs.iter().all(|o| *o == mirrored || *o == plain));
    }
}
