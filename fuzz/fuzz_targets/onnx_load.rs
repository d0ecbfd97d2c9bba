//! ONNX loader: bytes -> protobuf -> external-data resolution -> graph import (toposort, op check,
//! initializer conversion). Anything but an `Err` on bad input is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static DIR: tempfile::TempDir = tempfile::tempdir().expect("temp dir");
    }
    DIR.with(|d| {
        let p = d.path().join("m.onnx");
        if std::fs::write(&p, data).is_err() {
            return;
        }
        // A small weights file beside the model, so external-data references have something to hit.
        let _ = std::fs::write(d.path().join("w.bin"), [0u8; 64]);
        let _ = automm::onnx::Graph::load(&p, &candle_core::Device::Cpu, None);
    });
});
