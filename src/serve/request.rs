//! Turning a `PredictRequest` into the model's input: the tensor shape checks and the parallel image
//! decoding, as plain functions (no runtime, no model) so that tests and the fuzzer drive exactly the
//! code the server runs. Every failure is an INVALID_ARGUMENT status naming the item and what was expected.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use rayon::prelude::*;
use tonic::Status;

use crate::data::Preprocess;
use crate::proto::PredictRequest;

/// Model input `[n, 3, s, s]` flattened, and `n`.
pub type Input = (Vec<f32>, usize);

/// What one request may cost: at most `max_items` images or tensor rows (the server's batch size, so a
/// request never runs as a larger batch than the server is sized for), and no work after the caller's
/// deadline or after it went away (checked before and between images).
#[derive(Debug, Clone, Default)]
pub struct Budget {
    /// Items per request.
    pub max_items: usize,
    /// The caller's deadline.
    pub deadline: Option<Instant>,
    /// Set when the caller went away.
    pub cancelled: Option<Arc<AtomicBool>>,
}

impl Budget {
    /// A budget of `max_items` items and nothing else.
    pub fn items(max_items: usize) -> Budget {
        Budget { max_items, ..Default::default() }
    }

    fn check_items(&self, n: usize, what: &str) -> Result<(), Status> {
        if n > self.max_items {
            return Err(Status::resource_exhausted(format!(
                "the request holds {n} {what}; this server takes at most {} per request (--max-batch-size): \
                 split it",
                self.max_items
            )));
        }
        Ok(())
    }

    /// DEADLINE_EXCEEDED or CANCELLED once the caller's time is up or it went away.
    pub fn check_time(&self) -> Result<(), Status> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Status::deadline_exceeded("the deadline passed while decoding the request"));
        }
        if self.cancelled.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Status::cancelled("the caller went away"));
        }
        Ok(())
    }
}

/// The number of items (images or tensor rows) a request holds, as its fields say before any decoding.
pub fn items(req: &PredictRequest) -> usize {
    match &req.tensor {
        Some(t) if req.images.is_empty() => t.shape.first().and_then(|&n| usize::try_from(n).ok()).unwrap_or(0),
        _ => req.images.len(),
    }
}

/// Validates and converts a request for a model with square input side `s`, within `budget`. Image
/// decoding runs on the rayon pool; callers on an async runtime run this inside `spawn_blocking`.
pub fn prepare(req: PredictRequest, s: usize, pp: &Preprocess, budget: &Budget) -> Result<Input, Status> {
    budget.check_time()?;
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
                    "tensor has shape {}; expected [N, 3, {s}, {s}] with N >= 1",
                    short_shape(&t.shape)
                )));
            }
            budget.check_items(usize::try_from(t.shape[0]).unwrap_or(usize::MAX), "tensor rows")?;
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
                    "tensor data holds {} values; shape {} needs {}",
                    data.len(),
                    short_shape(&t.shape),
                    need.map_or("more than fit in memory".to_string(), |v| v.to_string())
                )));
            }
            if let Some(i) = data.iter().position(|v| !v.is_finite()) {
                return Err(Status::invalid_argument(format!(
                    "tensor value {i} is {}; inputs must be finite numbers",
                    data[i]
                )));
            }
            Ok((data, n))
        }
        (false, None) => {
            let n = req.images.len();
            budget.check_items(n, "images")?;
            let parts = req
                .images
                .par_iter()
                .enumerate()
                .map(|(i, b)| {
                    budget.check_time()?;
                    pp.bytes_to_chw(b, Path::new(&format!("images[{i}]")))
                        .map_err(|e| Status::invalid_argument(format!("image {i}: {e}")))
                })
                .collect::<Result<Vec<Vec<f32>>, Status>>()?;
            Ok((parts.concat(), n))
        }
    }
}

/// A shape for an error message: the first dims and how many there are, so that a hostile 5,000-dim shape
/// cannot blow the message past the gRPC header limit.
fn short_shape(shape: &[i64]) -> String {
    if shape.len() <= 8 {
        return format!("{shape:?}");
    }
    format!("{:?} (... {} dims in all)", &shape[..8], shape.len())
}

/// Decodes wire bytes as a `PredictRequest` and [`prepare`]s it (16 items at most): the whole request path
/// short of the model (what the fuzz target drives).
pub fn decode_and_prepare(bytes: &[u8], s: usize, pp: &Preprocess) -> Result<Input, Status> {
    let req = PredictRequest::decode(bytes).map_err(|e| Status::invalid_argument(format!("bad request: {e}")))?;
    prepare(req, s, pp, &Budget::items(16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Normalization;
    use crate::proto::Tensor;

    fn pp() -> Preprocess {
        Preprocess::new(4, Normalization::Symmetric)
    }

    fn b() -> Budget {
        Budget::items(8)
    }

    #[test]
    fn tensor_shapes_are_checked_without_overflow() {
        let t = |shape: Vec<i64>, len: usize| PredictRequest {
            images: vec![],
            tensor: Some(Tensor { shape, data: vec![0.0; len], raw_data: vec![] }),
        };
        assert_eq!(prepare(t(vec![2, 3, 4, 4], 96), 4, &pp(), &b()).unwrap().1, 2);
        let e = prepare(t(vec![i64::MAX, 3, 4, 4], 96), 4, &pp(), &Budget::items(usize::MAX)).unwrap_err();
        assert!(e.message().contains("more than fit"), "{}", e.message());
        let e = prepare(t(vec![1, 3, 5, 4], 80), 4, &pp(), &b()).unwrap_err();
        assert!(e.message().contains("expected [N, 3, 4, 4]"), "{}", e.message());
        let raw = |bytes: usize| PredictRequest {
            images: vec![],
            tensor: Some(Tensor { shape: vec![1, 3, 4, 4], data: vec![], raw_data: vec![0; bytes] }),
        };
        assert_eq!(prepare(raw(192), 4, &pp(), &b()).unwrap().0.len(), 48);
        assert!(prepare(raw(190), 4, &pp(), &b()).unwrap_err().message().contains("4 per float32"));
        let e = prepare(t(vec![0, 3, 4, 4], 0), 4, &pp(), &b()).unwrap_err();
        assert!(e.message().contains("N >= 1"), "{}", e.message());
    }

    #[test]
    fn bad_image_names_its_index() {
        let req = PredictRequest { images: vec![vec![0x89, b'P', b'N', b'G'], b"junk".to_vec()], tensor: None };
        let e = prepare(req, 4, &pp(), &b()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("image "), "{}", e.message());
        assert!(decode_and_prepare(&[0xff, 0xff, 0xff], 4, &pp()).is_err());
    }

    #[test]
    fn budget_refuses_too_many_items_late_work_and_non_finite_values() {
        let png = {
            let mut buf = std::io::Cursor::new(Vec::new());
            image::RgbImage::new(1, 1).write_to(&mut buf, image::ImageFormat::Png).unwrap();
            buf.into_inner()
        };
        let many = PredictRequest { images: vec![png.clone(); 9], tensor: None };
        let e = prepare(many, 4, &pp(), &b()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("9 images") && e.message().contains("at most 8"), "{}", e.message());
        let rows = PredictRequest {
            images: vec![],
            tensor: Some(Tensor { shape: vec![9, 3, 4, 4], data: vec![0.0; 9 * 48], raw_data: vec![] }),
        };
        assert_eq!(prepare(rows, 4, &pp(), &b()).unwrap_err().code(), tonic::Code::ResourceExhausted);
        let late = Budget { deadline: Some(Instant::now()), ..b() };
        let one = PredictRequest { images: vec![png.clone()], tensor: None };
        assert_eq!(prepare(one.clone(), 4, &pp(), &late).unwrap_err().code(), tonic::Code::DeadlineExceeded);
        let gone = Budget { cancelled: Some(Arc::new(AtomicBool::new(true))), ..b() };
        assert_eq!(prepare(one.clone(), 4, &pp(), &gone).unwrap_err().code(), tonic::Code::Cancelled);
        assert_eq!(prepare(one, 4, &pp(), &b()).unwrap().1, 1);
        let mut data = vec![0.0; 48];
        data[7] = f32::NAN;
        let nan =
            PredictRequest { images: vec![], tensor: Some(Tensor { shape: vec![1, 3, 4, 4], data, raw_data: vec![] }) };
        let e = prepare(nan, 4, &pp(), &b()).unwrap_err();
        assert!(e.code() == tonic::Code::InvalidArgument && e.message().contains("value 7 is NaN"), "{}", e.message());
        let mut shape = vec![1i64; 5000];
        shape[0] = 1;
        let wide = PredictRequest { images: vec![], tensor: Some(Tensor { shape, data: vec![], raw_data: vec![] }) };
        let e = prepare(wide, 4, &pp(), &b()).unwrap_err();
        assert!(e.message().len() < 300 && e.message().contains("5000 dims"), "{}", e.message());
    }
}
