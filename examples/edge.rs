//! Embedding an exported model on an edge device: only `ort` (and `image` to decode), no automm, no
//! Python, no server. Uses an export made with `automm export --with-preprocessing`, which takes uint8
//! RGB images [N, S, S, 3] and does the scaling/normalisation inside the graph.
//!
//!   automm export --model runs/focal --output edge.onnx --with-preprocessing
//!   ORT_DYLIB_PATH=/path/to/libonnxruntime.so cargo run --release --example edge -- edge.onnx photo.jpg
//!
//! The class labels and the input size come from the model's metadata (`automm.classes`,
//! `automm.preprocess`), so the device needs nothing but the .onnx file.

use ort::session::Session;
use ort::value::Tensor;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, image] = args.as_slice() else {
        return Err("usage: edge MODEL.onnx IMAGE".into());
    };
    let lib = std::env::var("ORT_DYLIB_PATH").map_err(|_| "set ORT_DYLIB_PATH to the ONNX Runtime library")?;
    let env = ort::init_from(lib)?.with_name("edge").build()?;
    let mut session = Session::builder(&env)?.commit_from_file(model)?;

    let meta = session.metadata()?;
    let classes: Vec<String> = serde_json::from_str(&meta.custom("automm.classes").ok_or("not an automm export")?)?;
    let pre: serde_json::Value =
        serde_json::from_str(&meta.custom("automm.preprocess").ok_or("not an automm export")?)?;
    let size = pre["size"].as_u64().ok_or("automm.preprocess has no size")? as u32;
    drop(meta);

    // Resize the shorter side to `size`, center-crop `size` x `size`, keep RGB bytes (HWC).
    let img = image::open(image)?.to_rgb8();
    let (w, h) = img.dimensions();
    let scale = size as f32 / w.min(h) as f32;
    let (nw, nh) = (((w as f32 * scale).round() as u32).max(size), ((h as f32 * scale).round() as u32).max(size));
    let resized = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
    let crop = image::imageops::crop_imm(&resized, (nw - size) / 2, (nh - size) / 2, size, size).to_image();

    let input = Tensor::from_array((vec![1i64, size as i64, size as i64, 3], crop.into_raw()))?;
    let outputs = session.run(ort::inputs!["images" => input])?;
    let (_, probs) = outputs["probabilities"].try_extract_tensor::<f32>()?;
    let best = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0);
    println!("{} ({:.3})", classes[best], probs[best]);
    for (c, p) in classes.iter().zip(probs) {
        println!("  {c:<16} {p:.4}");
    }
    Ok(())
}
