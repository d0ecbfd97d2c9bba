//! Turning a `PredictRequest` into the model's input: the tensor shape checks and the parallel image
//! decoding, as plain functions (no runtime, no model) so that tests and the fuzzer drive exactly the
//! code the server runs. Every failure is an INVALID_ARGUMENT status naming the item and what was expected.

use std::path::Path;

use prost::Message;
use rayon::prelude::*;
use tonic::Status;

use crate::data::Preprocess;
use crate::proto::PredictRequest;

/// Model input `[n, 3, s, s]` flattened, and `n`.
pub type Input = (Vec<f32>, usize);

/// Validates and converts a request for a model with square input side `s`. Image decoding runs on the
/// rayon pool; callers on an async runtime run this inside `spawn_blocking`.
pub fn prepare(req: PredictRequest, s: usize, pp: &Preprocess) -> Result<Input, Status> {
    match (req.images.is_empty(), req.tensor) {
        (false, Some(_)) => Err(Status::invalid_argument("give either `images` or `tensor`, not both")),
        (true, None) => Err(Status::invalid_argument("the request has no `images` and no `tensor`")),
        (true, Some(t)) => {
            let want = [None, Some(3), Some(s as i64), Some(s as i64)];
            let ok = t.shape.len() == 4
                && t.shape[0] >= 1
                && t.shape.iter().zip(want).all(|(&d, w)| w.is_none_or(|w| w == d));
            if !ok {
                return Err(Status::invalid_argument(format!(
                    "tensor has shape {:?}; expected [N, 3, {s}, {s}] with N >= 1",
                    t.shape
                )));
            }
            let data = match (t.data.is_empty(), t.raw_data.is_empty()) {
                (false, false) => return Err(Status::invalid_argument("give tensor `data` or `raw_data`, not both")),
                (_, true) => t.data,
                (true, false) => {
                    if t.raw_data.len() % 4 != 0 {
                        return Err(Status::invalid_argument(format!(
                            "tensor raw_data holds {} bytes; expected 4 per float32 value",
                            t.raw_data.len()
                        )));
                    }
                    t.raw_data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
                }
            };
            // N comes from the wire: the product may not fit, which is a size mismatch like any other.
            let n = usize::try_from(t.shape[0]).unwrap_or(usize::MAX);
            let need = n.checked_mul(3 * s * s);
            if need != Some(data.len()) {
                return Err(Status::invalid_argument(format!(
                    "tensor data holds {} values; shape {:?} needs {}",
                    data.len(),
                    t.shape,
                    need.map_or("more than fit in memory".to_string(), |v| v.to_string())
                )));
            }
            Ok((data, n))
        }
        (false, None) => {
            let n = req.images.len();
            let parts = req
                .images
                .par_iter()
                .enumerate()
                .map(|(i, b)| {
                    pp.bytes_to_chw(b, Path::new(&format!("images[{i}]")))
                        .map_err(|e| Status::invalid_argument(format!("image {i}: {e}")))
                })
                .collect::<Result<Vec<Vec<f32>>, Status>>()?;
            Ok((parts.concat(), n))
        }
    }
}

/// Decodes wire bytes as a `PredictRequest` and [`prepare`]s it: the whole request path short of the
/// model (what the fuzz target drives).
pub fn decode_and_prepare(bytes: &[u8], s: usize, pp: &Preprocess) -> Result<Input, Status> {
    let req = PredictRequest::decode(bytes).map_err(|e| Status::invalid_argument(format!("bad request: {e}")))?;
    prepare(req, s, pp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Normalization;
    use crate::proto::Tensor;

    fn pp() -> Preprocess {
        Preprocess::new(4, Normalization::Symmetric)
    }

    #[test]
    fn tensor_shapes_are_checked_without_overflow() {
        let t = |shape: Vec<i64>, len: usize| PredictRequest {
            images: vec![],
            tensor: Some(Tensor { shape, data: vec![0.0; len], raw_data: vec![] }),
        };
        assert_eq!(prepare(t(vec![2, 3, 4, 4], 96), 4, &pp()).unwrap().1, 2);
        let e = prepare(t(vec![i64::MAX, 3, 4, 4], 96), 4, &pp()).unwrap_err();
        assert!(e.message().contains("more than fit"), "{}", e.message());
        let e = prepare(t(vec![1, 3, 5, 4], 80), 4, &pp()).unwrap_err();
        assert!(e.message().contains("expected [N, 3, 4, 4]"), "{}", e.message());
        let raw = |bytes: usize| PredictRequest {
            images: vec![],
            tensor: Some(Tensor { shape: vec![1, 3, 4, 4], data: vec![], raw_data: vec![0; bytes] }),
        };
        assert_eq!(prepare(raw(192), 4, &pp()).unwrap().0.len(), 48);
        assert!(prepare(raw(190), 4, &pp()).unwrap_err().message().contains("4 per float32"));
        let e = prepare(t(vec![0, 3, 4, 4], 0), 4, &pp()).unwrap_err();
        assert!(e.message().contains("N >= 1"), "{}", e.message());
    }

    #[test]
    fn bad_image_names_its_index() {
        let req = PredictRequest { images: vec![vec![0x89, b'P', b'N', b'G'], b"junk".to_vec()], tensor: None };
        let e = prepare(req, 4, &pp()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("image "), "{}", e.message());
        assert!(decode_and_prepare(&[0xff, 0xff, 0xff], 4, &pp()).is_err());
    }
}
