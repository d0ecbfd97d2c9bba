//! The server's request path short of the model: protobuf `PredictRequest` decoding, tensor shape checks
//! and image decoding/preprocessing (the exact functions `Predict` calls).
#![no_main]

use libfuzzer_sys::fuzz_target;

use automm::data::{Normalization, Preprocess};

fuzz_target!(|data: &[u8]| {
    let pp = Preprocess::new(16, Normalization::imagenet());
    let _ = automm::serve::request::decode_and_prepare(data, 16, &pp);
});
