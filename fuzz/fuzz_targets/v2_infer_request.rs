//! The KServe v2 request path short of the model: protobuf `ModelInferRequest` decoding, the input and
//! output checks, BYTES element splitting, and the same tensor/image preparation as `Predict`.
#![no_main]

use libfuzzer_sys::fuzz_target;

use automm::data::{Normalization, Preprocess};

fuzz_target!(|data: &[u8]| {
    let pp = Preprocess::new(16, Normalization::imagenet());
    let _ = automm::serve::v2::decode_and_prepare(data, 16, &pp);
});
