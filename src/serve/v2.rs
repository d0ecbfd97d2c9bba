//! The KServe Open Inference Protocol v2 (`inference.GRPCInferenceService`) with Triton's ModelConfig and
//! ModelStatistics, as thin RPCs over the same [`State`] as `automm.v1`: a ModelInfer becomes the
//! `PredictRequest` it means (an FP32 `[N, 3, S, S]` tensor or a BYTES tensor of encoded images) and runs
//! through the same checks, budget and dynamic batcher. tritonclient, KServe's SDK and perf_analyzer call
//! it; unknown request parameters are ignored, as Triton does.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use super::service::{grpc_timeout, CancelOnDrop, Outcome, Service};
use super::{request, ServingModel, State};
use crate::deploy::meta::{LOGITS, PROBABILITIES};
use crate::inference_proto as pb;
use crate::inference_proto::grpc_inference_service_server::GrpcInferenceService;
use crate::inference_proto::infer_parameter::ParameterChoice;
use crate::inference_proto::model_infer_response::InferOutputTensor;
use crate::proto::{PredictRequest, Tensor};

/// The protocol extensions ServerMetadata announces.
pub const EXTENSIONS: &[&str] = &["classification", "model_configuration", "statistics"];

/// The v2 service: the v1 [`Service`] it shares state and the inference path with.
#[derive(Clone)]
pub struct V2 {
    pub(super) inner: Service,
}

impl V2 {
    fn state(&self) -> &Arc<State> {
        &self.inner.state
    }

    /// The served model under `name`/`version` ("" means the current version), or NOT_FOUND.
    fn model(&self, name: &str, version: &str) -> Result<Arc<ServingModel>, Status> {
        let want = self.state().model_name();
        if name != want {
            return Err(Status::not_found(format!("unknown model `{name}`; this server serves `{want}`")));
        }
        let m = self.state().current();
        if !version.is_empty() && version != numeric_version(&m.version) {
            return Err(Status::not_found(format!(
                "model `{name}` has no version `{version}`; the served version is {}",
                numeric_version(&m.version)
            )));
        }
        Ok(m)
    }
}

/// The hot-swap counter of a served version (`3-1a2b...` -> `3`), the numeric version v2 clients expect.
pub fn numeric_version(version: &str) -> &str {
    version.split('-').next().unwrap_or(version)
}

fn param_u64(p: &pb::InferParameter) -> Option<u64> {
    match p.parameter_choice.as_ref()? {
        ParameterChoice::Uint64Param(v) => Some(*v),
        ParameterChoice::Int64Param(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

/// Splits Triton's BYTES wire layout (each element: 4-byte little-endian length, then the bytes).
fn split_bytes(raw: &[u8], name: &str) -> Result<Vec<Vec<u8>>, Status> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let bad =
            || Status::invalid_argument(format!("input `{name}`: BYTES contents are not length-prefixed elements"));
        let len = u32::from_le_bytes(rest.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
        let item = rest.get(4..4 + len).ok_or_else(bad)?;
        out.push(item.to_vec());
        rest = &rest[4 + len..];
    }
    Ok(out)
}

/// Prefixes a status message with the tensor it is about.
fn about(name: &str, s: Status) -> Status {
    Status::new(s.code(), format!("input `{name}`: {}", s.message()))
}

/// The `PredictRequest` a ModelInfer's one input means, for a model whose image input is `input_name`
/// with side `s`.
fn to_predict(req: &mut pb::ModelInferRequest, input_name: &str, s: usize) -> Result<PredictRequest, Status> {
    let [input] = req.inputs.as_mut_slice() else {
        return Err(Status::invalid_argument(format!(
            "expected 1 input (`{input_name}` FP32 [N, 3, {s}, {s}] or BYTES [N] of encoded images), got {}",
            req.inputs.len()
        )));
    };
    let raw = match req.raw_input_contents.len() {
        0 => None,
        1 => Some(std::mem::take(&mut req.raw_input_contents[0])),
        n => return Err(Status::invalid_argument(format!("1 input but {n} raw_input_contents entries"))),
    };
    let contents = input.contents.take().unwrap_or_default();
    let name = input.name.clone();
    match input.datatype.as_str() {
        "FP32" => {
            let (data, raw_data) = match raw {
                Some(r) if contents.fp32_contents.is_empty() => (vec![], r),
                None => (contents.fp32_contents, vec![]),
                Some(_) => {
                    return Err(Status::invalid_argument(format!(
                        "input `{name}`: both contents and raw_input_contents"
                    )))
                }
            };
            let need = input.shape.iter().try_fold(4u64, |a, &d| u64::try_from(d).ok().and_then(|d| a.checked_mul(d)));
            if !raw_data.is_empty() && need != Some(raw_data.len() as u64) {
                return Err(Status::invalid_argument(format!(
                    "input `{name}`: {} bytes of raw contents, but FP32 shape {:?} needs {}",
                    raw_data.len(),
                    input.shape,
                    need.map_or("more than fit".into(), |n| n.to_string())
                )));
            }
            Ok(PredictRequest { images: vec![], tensor: Some(Tensor { shape: input.shape.clone(), data, raw_data }) })
        }
        "BYTES" => {
            let images = match raw {
                Some(r) => split_bytes(&r, &name)?,
                None => contents.bytes_contents,
            };
            if input.shape.len() != 1 && !(input.shape.len() == 2 && input.shape[1] == 1)
                || input.shape.first().copied() != Some(images.len() as i64)
            {
                return Err(Status::invalid_argument(format!(
                    "input `{name}`: BYTES shape {:?} does not match its {} elements (expected [N] or [N, 1])",
                    input.shape,
                    images.len()
                )));
            }
            Ok(PredictRequest { images, tensor: None })
        }
        other => Err(Status::invalid_argument(format!(
            "input `{name}`: datatype {other} is not served; send FP32 [N, 3, {s}, {s}] or BYTES [N] of JPEG/PNG images"
        ))),
    }
}

/// Decodes wire bytes as a `ModelInferRequest`, turns it into the `PredictRequest` it means and
/// [`request::prepare`]s that (16 items at most): the v2 request path short of the model (the fuzz
/// target `v2_infer_request` drives it).
pub fn decode_and_prepare(bytes: &[u8], s: usize, pp: &crate::data::Preprocess) -> Result<request::Input, Status> {
    use prost::Message;
    let mut req =
        pb::ModelInferRequest::decode(bytes).map_err(|e| Status::invalid_argument(format!("bad request: {e}")))?;
    wanted(&req, 4)?;
    let predict = to_predict(&mut req, "input", s)?;
    request::prepare(predict, s, pp, &request::Budget::items(16))
}

/// An output as the request asked for it: a tensor, or top-`k` "value:index:label" strings.
enum Wanted {
    Tensor(&'static str),
    Classification(&'static str, usize),
}

fn wanted(req: &pb::ModelInferRequest, classes: usize) -> Result<Vec<Wanted>, Status> {
    if req.outputs.is_empty() {
        return Ok(vec![Wanted::Tensor(LOGITS), Wanted::Tensor(PROBABILITIES)]);
    }
    req.outputs
        .iter()
        .map(|o| {
            let name = match o.name.as_str() {
                LOGITS => LOGITS,
                PROBABILITIES => PROBABILITIES,
                other => {
                    return Err(Status::invalid_argument(format!(
                        "unknown output `{other}`; the outputs are `logits` and `probabilities`"
                    )))
                }
            };
            match o.parameters.get("classification").map(|p| param_u64(p).filter(|&k| k >= 1)) {
                None => Ok(Wanted::Tensor(name)),
                Some(Some(k)) => Ok(Wanted::Classification(name, (k as usize).min(classes))),
                Some(None) => Err(Status::invalid_argument(format!(
                    "output `{name}`: the classification parameter must be a positive integer"
                ))),
            }
        })
        .collect()
}

/// Output `name` of `scores` (`[n, k]`) as the request wanted it, and its raw bytes.
fn output(
    want: &Wanted,
    scores: &crate::deploy::engine::exported::Scores,
    n: usize,
    classes: &[String],
) -> (InferOutputTensor, Vec<u8>) {
    let k = classes.len();
    let pick = |name: &str| if name == LOGITS { &scores.logits } else { &scores.probabilities };
    match want {
        Wanted::Tensor(name) => {
            let raw = pick(name).iter().flat_map(|v| v.to_le_bytes()).collect();
            let t = InferOutputTensor {
                name: name.to_string(),
                datatype: "FP32".into(),
                shape: vec![n as i64, k as i64],
                ..Default::default()
            };
            (t, raw)
        }
        Wanted::Classification(name, top) => {
            let mut raw = Vec::new();
            for row in pick(name).chunks(k.max(1)) {
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                for &c in order.iter().take(*top) {
                    let s = format!("{}:{c}:{}", row[c], classes[c]);
                    raw.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    raw.extend_from_slice(s.as_bytes());
                }
            }
            let t = InferOutputTensor {
                name: name.to_string(),
                datatype: "BYTES".into(),
                shape: vec![n as i64, *top as i64],
                ..Default::default()
            };
            (t, raw)
        }
    }
}

impl V2 {
    async fn infer(&self, req: Request<pb::ModelInferRequest>) -> Result<Response<pb::ModelInferResponse>, Status> {
        let header_deadline = grpc_timeout(&req);
        let mut req = req.into_inner();
        let model = self.model(&req.model_name, &req.model_version)?;
        // `timeout` (microseconds) tightens the call's own deadline; `priority` picks the queue level (0 or
        // out of range: the default, as Triton does); Triton's other parameters (e.g. perf_analyzer's
        // triton_enable_empty_final_response) are accepted and ignored.
        let param_timeout =
            req.parameters.get("timeout").and_then(param_u64).filter(|&us| us > 0).map(Duration::from_micros);
        let timeout = [header_deadline, param_timeout].into_iter().flatten().min();
        let deadline = timeout.and_then(|d| Instant::now().checked_add(d));
        let outs = wanted(&req, model.classes.len())?;
        let input_name = req.inputs.first().map(|i| i.name.clone()).unwrap_or_default();
        let predict = to_predict(&mut req, &model.model.meta.input, model.input_size)?;
        let max = self.state().cfg.batch.max_batch_size;
        let _reserved = self.inner.reserve(request::items(&predict).min(max), model.input_size)?;
        let gone = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let budget = request::Budget { max_items: max, deadline, cancelled: Some(gone.0.clone()) };
        let level = self.state().cfg.batch.level(req.parameters.get("priority").and_then(param_u64));
        let scores = self.inner.infer(&model, predict, budget, level).await.map_err(|s| match s.code() {
            tonic::Code::InvalidArgument => about(&input_name, s),
            // A full queue is UNAVAILABLE in Triton's protocol (clients retry it).
            tonic::Code::ResourceExhausted if s.message().contains("queue is full") => Status::unavailable(s.message()),
            _ => s,
        })?;
        let n = scores.probabilities.len() / model.classes.len().max(1);
        let (outputs, raw_output_contents) = outs.iter().map(|w| output(w, &scores, n, &model.classes)).unzip();
        Ok(Response::new(pb::ModelInferResponse {
            model_name: req.model_name,
            model_version: numeric_version(&model.version).to_string(),
            id: req.id,
            parameters: HashMap::new(),
            outputs,
            raw_output_contents,
        }))
    }

    fn config(&self, model: &ServingModel) -> pb::ModelConfig {
        let cfg = &self.state().cfg;
        let (s, k) = (model.input_size as i64, model.classes.len() as i64);
        let fp32 = pb::DataType::TypeFp32 as i32;
        let out = |name: &str| pb::ModelOutput {
            name: name.into(),
            data_type: fp32,
            dims: vec![k],
            label_filename: "labels.txt".into(),
        };
        pb::ModelConfig {
            name: self.state().model_name(),
            platform: "onnxruntime_onnx".into(),
            backend: "onnxruntime".into(),
            max_batch_size: cfg.batch.max_batch_size as i32,
            input: vec![pb::ModelInput {
                name: model.model.meta.input.clone(),
                data_type: fp32,
                format: pb::model_input::Format::Nchw as i32,
                dims: vec![3, s, s],
            }],
            output: vec![out(LOGITS), out(PROBABILITIES)],
            instance_group: vec![pb::ModelInstanceGroup {
                name: "automm".into(),
                count: 1,
                gpus: vec![],
                kind: if cfg.num_gpus != 0 {
                    pb::model_instance_group::Kind::Gpu
                } else {
                    pb::model_instance_group::Kind::Cpu
                } as i32,
            }],
            default_model_filename: "model.onnx".into(),
            dynamic_batching: Some(pb::ModelDynamicBatching {
                preferred_batch_size: cfg.batch.preferred_batch_sizes.iter().map(|&p| p as i32).collect(),
                max_queue_delay_microseconds: cfg.batch.max_queue_delay.as_micros() as u64,
                preserve_ordering: false,
                priority_levels: cfg.batch.priority_levels as u64,
                default_priority_level: cfg.batch.default_priority_level as u64,
                default_queue_policy: Some(pb::ModelQueuePolicy {
                    timeout_action: pb::model_queue_policy::TimeoutAction::Reject as i32,
                    default_timeout_microseconds: 0,
                    allow_timeout_override: true,
                    max_queue_size: cfg.batch.max_queue_size as u32,
                }),
            }),
        }
    }

    fn statistics(&self, model: &ServingModel) -> pb::ModelStatistics {
        let m = &self.state().metrics;
        let d = |count: u64, ns: u64| Some(pb::StatisticDuration { count, ns });
        let (ok, failed) = (m.request_success.load(Relaxed), m.request_failure.load(Relaxed));
        let executions = m.execution_count.load(Relaxed);
        let compute_ns = m.compute_duration_us.load(Relaxed) * 1000;
        let batch_stats = m
            .batches
            .lock()
            .map(|b| {
                b.iter()
                    .map(|(&size, &(count, ns))| pb::InferBatchStatistics {
                        batch_size: size as u64,
                        compute_input: d(count, 0),
                        compute_infer: d(count, ns),
                        compute_output: d(count, 0),
                    })
                    .collect()
            })
            .unwrap_or_default();
        pb::ModelStatistics {
            name: self.state().model_name(),
            version: numeric_version(&model.version).to_string(),
            last_inference: m.last_inference_ms.load(Relaxed),
            inference_count: m.inference_count.load(Relaxed),
            execution_count: executions,
            inference_stats: Some(pb::InferStatistics {
                success: d(ok, m.success_ns.load(Relaxed)),
                fail: d(failed, m.failure_ns.load(Relaxed)),
                queue: d(m.queue_count.load(Relaxed), m.queue_duration_us.load(Relaxed) * 1000),
                compute_input: d(m.decode_count.load(Relaxed), m.decode_ns.load(Relaxed)),
                compute_infer: d(executions, compute_ns),
                compute_output: d(executions, 0),
                cache_hit: None,
                cache_miss: None,
            }),
            batch_stats,
        }
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for V2 {
    async fn server_live(&self, _: Request<pb::ServerLiveRequest>) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        // A hot swap replaces the model atomically, so there is always one to serve until shutdown.
        Ok(Response::new(pb::ServerReadyResponse { ready: !self.state().stopping.load(Relaxed) }))
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = req.into_inner();
        let ready = !self.state().stopping.load(Relaxed) && self.model(&r.name, &r.version).is_ok();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "automm".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        let m = self.model(&r.name, &r.version)?;
        let (s, k) = (m.input_size as i64, m.classes.len() as i64);
        let t = |name: &str, datatype: &str, shape: Vec<i64>| pb::model_metadata_response::TensorMetadata {
            name: name.into(),
            datatype: datatype.into(),
            shape,
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            name: r.name,
            versions: vec![numeric_version(&m.version).to_string()],
            platform: "onnxruntime_onnx".into(),
            inputs: vec![t(&m.model.meta.input, "FP32", vec![-1, 3, s, s])],
            outputs: vec![t(LOGITS, "FP32", vec![-1, k]), t(PROBABILITIES, "FP32", vec![-1, k])],
        }))
    }

    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        // Counted with v1's calls, so the statistics and Prometheus counters cover both protocols.
        let mut outcome = Outcome::start(&self.state().metrics);
        let r = self.infer(req).await;
        outcome.finish(r)
    }

    async fn model_config(
        &self,
        req: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = req.into_inner();
        let m = self.model(&r.name, &r.version)?;
        Ok(Response::new(pb::ModelConfigResponse { config: Some(self.config(&m)) }))
    }

    async fn model_statistics(
        &self,
        req: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let r = req.into_inner();
        // An empty name asks for every model (there is one).
        let name = if r.name.is_empty() { self.state().model_name() } else { r.name };
        let m = self.model(&name, &r.version)?;
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats: vec![self.statistics(&m)] }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_elements_and_versions() {
        let mut raw = Vec::new();
        for item in [&b"ab"[..], b"", b"xyz"] {
            raw.extend_from_slice(&(item.len() as u32).to_le_bytes());
            raw.extend_from_slice(item);
        }
        assert_eq!(split_bytes(&raw, "x").unwrap(), vec![b"ab".to_vec(), vec![], b"xyz".to_vec()]);
        let e = split_bytes(&raw[..raw.len() - 1], "images").unwrap_err();
        assert!(e.message().contains("input `images`"), "{}", e.message());
        assert_eq!(numeric_version("3-1a2b3c"), "3");
    }

    /// What the fuzz target does, on mutations of a valid request: every answer is a status, never a panic.
    #[test]
    fn mutated_requests_never_panic() {
        use prost::Message;
        let pp = crate::data::Preprocess::new(4, crate::data::Normalization::imagenet());
        let good = pb::ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![1, 3, 4, 4],
                ..Default::default()
            }],
            raw_input_contents: vec![vec![0; 192]],
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(decode_and_prepare(&good, 4, &pp).unwrap().1, 1);
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..3000 {
            let mut b = good.clone();
            for _ in 0..1 + (x % 4) {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let i = (x >> 33) as usize % b.len();
                b[i] = (x >> 13) as u8;
            }
            let _ = decode_and_prepare(&b, 4, &pp);
        }
    }
}
