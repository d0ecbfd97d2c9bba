//! `automm doctor`: what automm finds on this machine (ONNX Runtime, CUDA, threads).

use anyhow::Result;

pub fn cmd_doctor() -> Result<()> {
    println!("automm {}", env!("CARGO_PKG_VERSION"));
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("threads: {threads} available; rayon pool {}", rayon::current_num_threads());
    let isa = automm::onnx::kernels::Isa::detect(false);
    if automm::util::device::candle_ops_only() {
        println!("CPU kernels: off (AUTOMM_KERNELS=candle: candle's ops only, the path a GPU takes)");
    } else {
        println!("CPU kernels: ours, {isa:?} tiles (AUTOMM_KERNELS=candle turns them off)");
    }
    match automm::deploy::engine::ort::locate() {
        Ok(loc) => {
            println!("ONNX Runtime: {} (found via {})", loc.path.display(), loc.source);
            if loc.source != "ORT_DYLIB_PATH" {
                // A venv's library is found only while the venv is active; this makes it permanent.
                println!("  to use it from any shell: export ORT_DYLIB_PATH={}", loc.path.display());
            }
            match automm::deploy::engine::ort::loaded() {
                Ok((_, info)) => println!("  {info}"),
                Err(e) => println!("  cannot load it: {e}"),
            }
        }
        Err(e) => println!("ONNX Runtime: not found. {e}"),
    }
    println!("CUDA (candle): {}", automm::util::device::cuda_status());
    println!("CUDA (ONNX Runtime): {}", automm::deploy::engine::ort::cuda_status());
    Ok(())
}
