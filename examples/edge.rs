//! Embedding an exported model on an edge device: only `ort` (and `image` to decode), no automm, no
//! Python, no server. Uses an export made with `automm export --with-preprocessing`, which takes uint8
//! RGB images [N, S, S, 3] and does the scaling/normalisation inside the graph.
//!
//!   automm export --model runs/focal --output edge.onnx --with-preprocessing
//!   cargo run --release --example edge -- edge.onnx photo.jpg
//!
//! The class labels and the input size come from the model's metadata (`automm.classes`,
//! `automm.preprocess`), so the device needs nothing but the .onnx file and the ONNX Runtime library,
//! found as `automm` finds it: `ORT_DYLIB_PATH`, next to the program, or python3's `onnxruntime` package.

use ort::session::Session;
use ort::value::Tensor;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, image] = args.as_slice() else {
        return Err("usage: edge MODEL.onnx IMAGE".into());
    };
    let lib = onnx_runtime_library().ok_or(
        "ONNX Runtime library not found: set ORT_DYLIB_PATH, put libonnxruntime.so next to this program, \
         or `python3 -m pip install onnxruntime==1.31.1`",
    )?;
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

/// `ORT_DYLIB_PATH`, else a `libonnxruntime.so*` next to this program, else the one inside python3's
/// `onnxruntime` package (`onnxruntime/capi/`).
fn onnx_runtime_library() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    let in_dir = |dir: &std::path::Path| -> Option<std::path::PathBuf> {
        let mut libs: Vec<_> = std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).collect();
        libs.retain(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so")));
        libs.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        libs.into_iter().next()
    };
    let exe_dir = std::env::current_exe().ok()?.parent()?.to_path_buf();
    if let Some(p) = in_dir(&exe_dir) {
        return Some(p);
    }
    let script = "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))";
    let out = std::process::Command::new("python3").args(["-c", script]).output().ok()?;
    in_dir(std::path::Path::new(String::from_utf8_lossy(&out.stdout).trim()))
}
