//! The compute device for `env.num_gpus`: candle's CUDA device 0 when asked for, compiled in and
//! usable, the CPU otherwise (with a warning that says why).

use candle_core::Device;

/// The device for `env.num_gpus`: CUDA 0 when asked for and available, CPU otherwise (logged).
pub fn select_device(num_gpus: i64) -> Device {
    if num_gpus == 0 {
        return Device::Cpu;
    }
    #[cfg(feature = "cuda")]
    {
        match Device::new_cuda(0) {
            Ok(d) => return d,
            Err(e) => {
                tracing::warn!("env.num_gpus={num_gpus} but CUDA is not usable ({}); running on the CPU", why(&e))
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    if num_gpus > 0 {
        tracing::warn!("env.num_gpus={num_gpus} but this automm was built without `--features cuda`; training on CPU");
    }
    Device::Cpu
}

/// The first line of a CUDA error (candle appends a backtrace), with the driver stub said in words.
#[cfg(feature = "cuda")]
fn why(e: &candle_core::Error) -> String {
    let s = e.to_string();
    if s.contains("CUDA_ERROR_STUB_LIBRARY") {
        return "no CUDA driver on this machine (the loader found the link-time stub libcuda of scripts/cuda-env.sh)"
            .into();
    }
    s.lines().next().unwrap_or_default().to_string()
}

/// Whether candle's CUDA backend is usable here, in words.
pub fn cuda_status() -> String {
    #[cfg(feature = "cuda")]
    {
        match Device::new_cuda(0) {
            Ok(_) => "available (device 0)".into(),
            Err(e) => format!("compiled in but not usable: {}", why(&e)),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        "not compiled in (build with --features cuda)".into()
    }
}

/// True when `AUTOMM_KERNELS=candle` is set: every op then runs on candle's own tensor ops (with autograd)
/// even on the CPU, none on our CPU kernels — the path a CUDA device takes, so it can be checked here.
pub fn candle_ops_only() -> bool {
    static ONLY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONLY.get_or_init(|| std::env::var("AUTOMM_KERNELS").is_ok_and(|v| v.eq_ignore_ascii_case("candle")))
}

/// True when our CPU kernels may run on `t`: f32 in CPU memory, and not [`candle_ops_only`]. Every kernel
/// and custom op is gated on it, so a CUDA tensor always takes candle's ops.
pub fn own_kernels_for(t: &candle_core::Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && !candle_ops_only()
}
