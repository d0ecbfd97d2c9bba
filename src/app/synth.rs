//! A procedurally drawn, imbalanced image dataset for demos and tests: each class is a shape with its
//! own colour family and texture, drawn at a random position, size and rotation over a noisy background,
//! so the task is learnable but not trivial. Written as PNG files plus a CSV (`image,label`).

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Class names of the generated data, in the tutorial's imbalance order (largest class first).
pub const CLASSES: &[&str] = &["circle", "square", "triangle", "ring"];

fn draw(class: usize, size: u32, rng: &mut impl Rng) -> RgbImage {
    let s = size as f32;
    // Background: a random dull colour with per-pixel noise.
    let bg = [rng.random_range(60..180) as f32, rng.random_range(60..180) as f32, rng.random_range(60..180) as f32];
    let base: [f32; 3] = match class {
        0 => [200.0, 80.0, 60.0],
        1 => [70.0, 170.0, 90.0],
        2 => [80.0, 100.0, 210.0],
        _ => [200.0, 180.0, 70.0],
    };
    // Colours overlap between classes: the hue is jittered strongly.
    let fg: Vec<f32> = base.iter().map(|&c| (c + rng.random_range(-70.0..70.0f32)).clamp(0.0, 255.0)).collect();
    let cx = rng.random_range(0.3..0.7) * s;
    let cy = rng.random_range(0.3..0.7) * s;
    let r = rng.random_range(0.15..0.3) * s;
    let angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (sin, cos) = angle.sin_cos();
    let stripes = rng.random_range(3.0..8.0f32);
    let noise = rng.random_range(10.0..45.0f32);
    let mut img = RgbImage::new(size, size);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let (u, v) = (dx * cos + dy * sin, -dx * sin + dy * cos);
        let inside = match class {
            0 => (dx * dx + dy * dy).sqrt() < r,
            1 => u.abs() < r * 0.85 && v.abs() < r * 0.85,
            2 => v > -r * 0.6 && v < r * 0.9 && u.abs() < (r * 0.9 - v) * 0.6,
            _ => {
                let d = (dx * dx + dy * dy).sqrt();
                d < r && d > r * 0.55
            }
        };
        // Texture: stripes along the rotated axis for squares and triangles.
        let tex =
            if inside && (class == 1 || class == 2) && ((u / s * stripes * 6.0).sin() > 0.3) { 0.75 } else { 1.0 };
        let mut px = [0u8; 3];
        for c in 0..3 {
            let v = if inside { fg[c] * tex } else { bg[c] };
            px[c] = (v + rng.random_range(-noise..noise)).clamp(0.0, 255.0) as u8;
        }
        *p = Rgb(px);
    }
    img
}

/// Writes `counts[c]` images of class `c` (PNG, `size` pixels) under `dir/images` and a CSV listing
/// them (`image,label`, paths relative to the CSV). Returns the CSV path.
pub fn make_dataset(dir: &Path, name: &str, counts: &[usize], size: u32, seed: u64) -> Result<PathBuf> {
    let img_dir = dir.join("images").join(name);
    std::fs::create_dir_all(&img_dir).map_err(|e| Error::io(&img_dir, e))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut csv = String::from("image,label\n");
    for (class, &n) in counts.iter().enumerate().take(CLASSES.len()) {
        for i in 0..n {
            let img = draw(class, size, &mut rng);
            let rel = format!("images/{name}/{}_{i:04}.png", CLASSES[class]);
            let path = dir.join(&rel);
            img.save(&path).map_err(|e| Error::Image { path: path.clone(), row: None, msg: e.to_string() })?;
            csv.push_str(&format!("{rel},{}\n", CLASSES[class]));
        }
    }
    let out = dir.join(format!("{name}.csv"));
    crate::util::fs::write_atomic(&out, csv.as_bytes())?;
    Ok(out)
}
