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
            Err(e) => tracing::warn!("env.num_gpus={num_gpus} but CUDA is not usable ({e}); training on CPU"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    if num_gpus > 0 {
        tracing::warn!("env.num_gpus={num_gpus} but this automm was built without `--features cuda`; training on CPU");
    }
    Device::Cpu
}

/// Whether candle's CUDA backend is usable here, in words.
pub fn cuda_status() -> String {
    #[cfg(feature = "cuda")]
    {
        match Device::new_cuda(0) {
            Ok(_) => "available (device 0)".into(),
            Err(e) => format!("compiled in but not usable: {e}"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        "not compiled in (build with --features cuda)".into()
    }
}
