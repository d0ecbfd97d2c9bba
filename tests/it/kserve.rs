//! The KServe v2 / Triton protocol (`inference.GRPCInferenceService`) through a tonic client of our own
//! proto, against an in-process server on a free 127.0.0.1 port: health and metadata, ModelInfer on raw
//! and typed FP32 tensors and on encoded images (equal to the model folder's predictions), the
//! classification extension, ModelConfig from the serve settings, statistics that move, and the status
//! code of every bad request. With `AUTOMM_README_NETWORK=1` (CI) the same server is also called by
//! tritonclient[grpc] 2.73.0 from PyPI, in a venv (`tests/kserve_tritonclient.py`).

use std::collections::HashMap;
use std::path::Path;

use automm::inference_proto as pb;
use automm::inference_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use automm::inference_proto::infer_parameter::ParameterChoice;
use automm::inference_proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use tonic::Code;

use crate::serve::{config, images, model, start};

type V2Client = GrpcInferenceServiceClient<tonic::transport::Channel>;

fn fp32_request(name: &str, shape: Vec<i64>, raw: Vec<u8>) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: name.into(),
        id: "req-7".into(),
        inputs: vec![InferInputTensor { name: "input".into(), datatype: "FP32".into(), shape, ..Default::default() }],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

fn bytes_request(name: &str, imgs: &[Vec<u8>]) -> pb::ModelInferRequest {
    let mut raw = Vec::new();
    for i in imgs {
        raw.extend_from_slice(&(i.len() as u32).to_le_bytes());
        raw.extend_from_slice(i);
    }
    pb::ModelInferRequest {
        model_name: name.into(),
        inputs: vec![InferInputTensor {
            name: "images".into(),
            datatype: "BYTES".into(),
            shape: vec![imgs.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
}

fn floats(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// The served model's ModelConfig.
async fn model_config(c: &mut V2Client) -> pb::ModelConfig {
    let r = pb::ModelConfigRequest { name: "model".into(), version: String::new() };
    c.model_config(r).await.unwrap().into_inner().config.unwrap()
}

async fn code_of(c: &mut V2Client, r: pb::ModelInferRequest) -> (Code, String) {
    let e = c.model_infer(r).await.expect_err("a bad request must fail");
    (e.code(), e.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_protocol_health_metadata_infer_config_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, onnx, test) = model(dir.path());
    let server = start(config(&onnx, dir.path())).await;
    let mut c = V2Client::connect(server.0.url()).await.unwrap();
    assert!(c.server_live(pb::ServerLiveRequest {}).await.unwrap().into_inner().live);
    assert!(c.server_ready(pb::ServerReadyRequest {}).await.unwrap().into_inner().ready);
    let meta = c.server_metadata(pb::ServerMetadataRequest {}).await.unwrap().into_inner();
    assert_eq!(meta.name, "automm");
    assert!(meta.extensions.iter().any(|e| e == "statistics"), "{meta:?}");
    // The model's name is the file stem ("model.onnx" -> "model"); versions are numeric.
    let ready = |name: &str, version: &str| pb::ModelReadyRequest { name: name.into(), version: version.into() };
    assert!(c.model_ready(ready("model", "")).await.unwrap().into_inner().ready);
    assert!(c.model_ready(ready("model", "1")).await.unwrap().into_inner().ready);
    assert!(!c.model_ready(ready("model", "2")).await.unwrap().into_inner().ready);
    assert!(!c.model_ready(ready("other", "")).await.unwrap().into_inner().ready);
    let md = c
        .model_metadata(pb::ModelMetadataRequest { name: "model".into(), version: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(md.versions, ["1"]);
    assert_eq!((md.inputs[0].datatype.as_str(), md.inputs[0].shape.clone()), ("FP32", vec![-1, 3, 33, 33]));
    assert_eq!(md.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["logits", "probabilities"]);

    // Encoded images as a BYTES tensor: equal to the model folder's predictions; `id` echoed.
    let local = {
        let p = automm::deploy::predict::Predictor::load(&folder, &candle_core::Device::Cpu).unwrap();
        p.predict_table(&automm::data::Table::load(&test, None, None).unwrap(), true).unwrap()
    };
    let imgs = images(&test);
    let mut r = bytes_request("model", &imgs);
    r.id = "batch-1".into();
    // Unknown parameters (perf_analyzer sends this one) are ignored.
    r.parameters.insert(
        "triton_enable_empty_final_response".into(),
        pb::InferParameter { parameter_choice: Some(ParameterChoice::BoolParam(true)) },
    );
    let out = c.model_infer(r).await.unwrap().into_inner();
    assert_eq!((out.id.as_str(), out.model_version.as_str(), out.model_name.as_str()), ("batch-1", "1", "model"));
    assert_eq!(out.outputs[1].shape, vec![imgs.len() as i64, 4]);
    let probs = floats(&out.raw_output_contents[1]);
    assert!(max_diff(&probs, &local.probs) <= 1e-4, "v2 vs local: {}", max_diff(&probs, &local.probs));
    let logits = floats(&out.raw_output_contents[0]);
    let soft: Vec<f32> = logits
        .chunks(4)
        .flat_map(|row| {
            let m = row.iter().cloned().fold(f32::MIN, f32::max);
            let e: Vec<f32> = row.iter().map(|v| (v - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.into_iter().map(move |v| v / s)
        })
        .collect();
    assert!(max_diff(&soft, &probs) <= 1e-5, "softmax(logits) vs probabilities");

    // An FP32 tensor, raw and typed, with the classification extension on probabilities.
    let pp = automm::data::Preprocess::new(33, automm::data::Normalization::imagenet());
    let x = pp.bytes_to_chw(&imgs[0], Path::new("x")).unwrap();
    let raw: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut r = fp32_request("model", vec![1, 3, 33, 33], raw.clone());
    let top2 = pb::InferParameter { parameter_choice: Some(ParameterChoice::Int64Param(2)) };
    r.outputs = vec![InferRequestedOutputTensor {
        name: "probabilities".into(),
        parameters: HashMap::from([("classification".to_string(), top2)]),
    }];
    let out = c.model_infer(r).await.unwrap().into_inner();
    assert_eq!((out.outputs[0].datatype.as_str(), out.outputs[0].shape.clone()), ("BYTES", vec![1, 2]));
    let first = &out.raw_output_contents[0];
    let len = u32::from_le_bytes(first[..4].try_into().unwrap()) as usize;
    let entry = std::str::from_utf8(&first[4..4 + len]).unwrap();
    let best = local.preds[0] as usize;
    let classes = ["circle", "ring", "square", "triangle"];
    assert!(entry.ends_with(&format!(":{best}:{}", classes[best])), "{entry}");
    let mut typed = fp32_request("model", vec![1, 3, 33, 33], vec![]);
    typed.raw_input_contents.clear();
    typed.inputs[0].contents = Some(pb::InferTensorContents { fp32_contents: x.clone(), ..Default::default() });
    let out = c.model_infer(typed).await.unwrap().into_inner();
    assert!(max_diff(&floats(&out.raw_output_contents[1]), &local.probs[..4]) <= 1e-4);

    // ModelConfig says what the server was started with.
    let cfg = model_config(&mut c).await;
    assert_eq!((cfg.max_batch_size, cfg.input[0].dims.clone()), (16, vec![3, 33, 33]));
    let db = cfg.dynamic_batching.unwrap();
    assert_eq!(db.max_queue_delay_microseconds, 20_000);
    assert_eq!(db.default_queue_policy.unwrap().max_queue_size, 256);

    // Bad requests get their codes and name what is wrong.
    let (code, msg) = code_of(&mut c, fp32_request("model", vec![1, 3, 33, 33], raw[..raw.len() - 4].to_vec())).await;
    assert!(code == Code::InvalidArgument && msg.contains("input `input`") && msg.contains("bytes"), "{msg}");
    let (code, msg) = code_of(&mut c, fp32_request("model", vec![1, 3, 32, 32], vec![0; 3 * 32 * 32 * 4])).await;
    assert!(code == Code::InvalidArgument && msg.contains("expected [N, 3, 33, 33]"), "{msg}");
    let mut wrong_type = fp32_request("model", vec![1, 3, 33, 33], raw.clone());
    wrong_type.inputs[0].datatype = "INT64".into();
    let (code, msg) = code_of(&mut c, wrong_type).await;
    assert!(code == Code::InvalidArgument && msg.contains("datatype INT64"), "{msg}");
    let (code, _) = code_of(&mut c, fp32_request("nope", vec![1, 3, 33, 33], raw.clone())).await;
    assert_eq!(code, Code::NotFound);
    let mut old = fp32_request("model", vec![1, 3, 33, 33], raw.clone());
    old.model_version = "7".into();
    assert_eq!(code_of(&mut c, old).await.0, Code::NotFound);
    let mut unknown_out = fp32_request("model", vec![1, 3, 33, 33], raw.clone());
    unknown_out.outputs = vec![InferRequestedOutputTensor { name: "features".into(), ..Default::default() }];
    assert_eq!(code_of(&mut c, unknown_out).await.0, Code::InvalidArgument);
    let (code, msg) = code_of(&mut c, bytes_request("model", &[b"not an image".to_vec()])).await;
    assert!(code == Code::InvalidArgument && msg.contains("input `images`"), "{msg}");

    // Statistics count what happened: 3 good requests and the 7 bad ones above.
    let stats = c
        .model_statistics(pb::ModelStatisticsRequest { name: "model".into(), version: String::new() })
        .await
        .unwrap()
        .into_inner()
        .model_stats
        .remove(0);
    let inf = stats.inference_stats.unwrap();
    assert_eq!(inf.success.unwrap().count, 3);
    assert_eq!(inf.fail.unwrap().count, 7);
    assert_eq!(stats.inference_count, imgs.len() as u64 + 2);
    assert!(stats.execution_count >= 3 && stats.last_inference > 0, "{stats:?}");
    assert!(inf.queue.unwrap().count >= 3 && inf.compute_infer.unwrap().ns > 0);
    let batched: u64 = stats.batch_stats.iter().map(|b| b.batch_size * b.compute_infer.unwrap().count).sum();
    assert_eq!(batched, stats.inference_count);
    // Prometheus: model and version labels, failures by code, latency histograms, nothing pending.
    let text = server.metrics().await;
    let labels = "model=\"model\",version=\"1-";
    assert!(text.contains(&format!("automm_request_success_total{{{labels}")), "{text}");
    let by_code = |code: &str| {
        text.lines()
            .find(|l| l.starts_with("automm_request_failure_by_code_total") && l.contains(&format!("code=\"{code}\"")))
            .and_then(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
    };
    assert_eq!((by_code("InvalidArgument"), by_code("NotFound")), (Some(5), Some(2)), "{text}");
    let count = text.lines().find(|l| l.starts_with("automm_request_duration_seconds_count")).unwrap();
    assert!(count.ends_with(" 10"), "{count}");
    let inf =
        text.lines().find(|l| l.starts_with("automm_request_duration_seconds_bucket") && l.contains("+Inf")).unwrap();
    assert!(inf.ends_with(" 10"), "{inf}");
    assert!(
        text.contains("automm_queue_duration_seconds_bucket") && text.contains("automm_compute_duration_seconds_sum")
    );
    assert!(text.lines().any(|l| l.starts_with("automm_pending_requests{") && l.ends_with(" 0")), "{text}");
    let first = automm::data::Table::load(&test, None, None).unwrap().rows[0].image.clone();
    tritonclient_check(&server.0.url(), &first, &local.probs[..4]);
    server.stop().await;
}

/// `priority` is honoured: a level-1 request overtakes level-2 requests queued before it. The batch is
/// held by a long queue delay, so the order is decided by the queue, not by timing: two low requests
/// (4 + 3 items) wait for company; a high one (4 items) then fills a batch of 8 with the first low one
/// and runs at once, while the second low one waits out the delay (FIFO would run the two low ones and
/// keep the high one waiting). ModelConfig reports the levels and preferred sizes; readiness turns false
/// when shutdown begins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_priority_levels_let_a_request_overtake_the_queue() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let (_folder, onnx, test) = model(dir.path());
    let mut cfg = config(&onnx, dir.path());
    cfg.batch.max_batch_size = 8;
    cfg.batch.max_queue_delay = std::time::Duration::from_millis(1500);
    cfg.batch.preferred_batch_sizes = vec![8];
    let server = start(cfg).await;
    let state = server.0.running.state.clone();
    let url = server.0.url();
    let pp = automm::data::Preprocess::new(33, automm::data::Normalization::imagenet());
    let x = pp.bytes_to_chw(&images(&test)[0], Path::new("x")).unwrap();
    let request = |items: usize, priority: Option<u64>| {
        let raw: Vec<u8> = (0..items).flat_map(|_| x.iter().flat_map(|v| v.to_le_bytes())).collect();
        let mut r = fp32_request("model", vec![items as i64, 3, 33, 33], raw);
        if let Some(p) = priority {
            r.parameters.insert(
                "priority".into(),
                pb::InferParameter { parameter_choice: Some(ParameterChoice::Uint64Param(p)) },
            );
        }
        r
    };
    let finished = std::sync::Arc::new(std::sync::Mutex::new(Vec::<&str>::new()));
    let send = |name: &'static str, r: pb::ModelInferRequest| {
        let (url, finished) = (url.clone(), finished.clone());
        tokio::spawn(async move {
            let mut c = V2Client::connect(url).await.unwrap();
            let out = c.model_infer(r).await.unwrap().into_inner();
            finished.lock().unwrap().push(name);
            out
        })
    };
    let queued = |n: i64| {
        let state = state.clone();
        async move {
            while state.metrics.queue_depth.load(Relaxed) < n {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    };
    let low_a = send("low-a", request(4, None));
    queued(1).await;
    // An out-of-range priority falls back to the default level (2 here), as Triton's does: not an error.
    let low_b = send("low-b", request(3, Some(9)));
    queued(2).await;
    let high = send("high", request(4, Some(1)));
    let out = high.await.unwrap();
    assert_eq!(out.outputs[1].shape, vec![4, 4]);
    assert!(!finished.lock().unwrap().contains(&"low-b"), "low-b must still wait when high is answered");
    low_a.await.unwrap();
    low_b.await.unwrap();
    let order = finished.lock().unwrap().clone();
    assert_eq!(order.last(), Some(&"low-b"), "the second low request waited out the delay: {order:?}");
    let mut c = V2Client::connect(url.clone()).await.unwrap();
    let cfg = model_config(&mut c).await;
    let db = cfg.dynamic_batching.unwrap();
    assert_eq!((db.priority_levels, db.default_priority_level, db.preferred_batch_size), (2, 2, vec![8]));
    // Once shutdown begins (the flag the shutdown path sets first), readiness says no while live stays yes,
    // so a load balancer stops routing here while the queue drains.
    state.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(!c.server_ready(pb::ServerReadyRequest {}).await.unwrap().into_inner().ready);
    let ready = pb::ModelReadyRequest { name: "model".into(), version: String::new() };
    assert!(!c.model_ready(ready).await.unwrap().into_inner().ready);
    assert!(c.server_live(pb::ServerLiveRequest {}).await.unwrap().into_inner().live);
    server.stop().await;
}

/// The python3 of a venv with tritonclient[grpc]==2.73.0 from PyPI (made once per machine), or None
/// (reported as NOT RUN) unless `AUTOMM_README_NETWORK=1` allows the download, as in CI.
fn tritonclient_python() -> Option<std::path::PathBuf> {
    if std::env::var("AUTOMM_README_NETWORK").map_or(true, |v| v != "1") {
        eprintln!("NOT RUN (tritonclient part): set AUTOMM_README_NETWORK=1 to install tritonclient from PyPI");
        return None;
    }
    static VENV: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = VENV.lock().unwrap_or_else(|p| p.into_inner());
    let venv = std::env::temp_dir().join("automm-tritonclient-2.73.0");
    let py = venv.join("bin/python3");
    let ready = venv.join("installed");
    if !ready.is_file() {
        let ok = std::process::Command::new("python3").arg("-m").arg("venv").arg(&venv).status().unwrap().success();
        assert!(ok, "python3 -m venv failed");
        let ok = std::process::Command::new(&py)
            .args(["-m", "pip", "install", "--quiet", "tritonclient[grpc]==2.73.0"])
            .status()
            .unwrap()
            .success();
        assert!(ok, "pip install tritonclient[grpc]==2.73.0 failed");
        std::fs::write(&ready, b"").unwrap();
    }
    Some(py)
}

/// tritonclient against the running server (`tests/kserve_tritonclient.py`).
fn tritonclient_check(url: &str, image: &Path, first_probs: &[f32]) {
    let Some(py) = tritonclient_python() else { return };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kserve_tritonclient.py");
    let probs: Vec<String> = first_probs.iter().map(|p| p.to_string()).collect();
    let out = std::process::Command::new(&py)
        .arg(script)
        .arg(url.trim_start_matches("http://"))
        .arg(image)
        .arg(probs.join(","))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("tritonclient: all checks passed"), "{text}");
    eprintln!("{text}");
}

/// `automm export --triton-repository` writes Triton's layout; its config.pbtxt parses with
/// tritonclient's own `model_config_pb2` (when the venv is allowed) and says what we wrote.
#[test]
fn triton_repository_export() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, _, _) = model(dir.path());
    let repo = dir.path().join("repo");
    let out = crate::common::bin()
        .args(["export", "--quiet", "--model"])
        .arg(&folder)
        .arg("--triton-repository")
        .arg(&repo)
        .args(["--model-name", "shapes", "--max-batch-size", "8"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let entry = repo.join("shapes");
    assert!(entry.join("1/model.onnx").is_file());
    assert_eq!(std::fs::read_to_string(entry.join("labels.txt")).unwrap(), "circle\nring\nsquare\ntriangle\n");
    let cfg = entry.join("config.pbtxt");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("platform: \"onnxruntime_onnx\"") && text.contains("max_batch_size: 8"), "{text}");
    let Some(py) = tritonclient_python() else { return };
    let parse =
        "import sys\nfrom google.protobuf import text_format\nfrom tritonclient.grpc import model_config_pb2 as mc\n\
        c = text_format.Parse(open(sys.argv[1]).read(), mc.ModelConfig())\n\
        print(c.name, c.platform, c.max_batch_size, list(c.input[0].dims), c.input[0].data_type == mc.TYPE_FP32, \
        [o.name for o in c.output], list(c.output[1].dims), c.output[1].label_filename, \
        c.dynamic_batching.max_queue_delay_microseconds, c.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU)";
    let out = std::process::Command::new(py).arg("-c").arg(parse).arg(&cfg).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        said.trim(),
        "shapes onnxruntime_onnx 8 [3, 33, 33] True ['logits', 'probabilities'] [4] labels.txt 2000 True"
    );
}

/// The KServe ServingRuntime starts `automm serve` with flags it has, listens on the port it declares,
/// and its readiness probe asks about the service the server reports in grpc.health.v1.
#[test]
fn kserve_runtime_uses_real_serve_flags() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("deploy/kserve/servingruntime.yaml")).unwrap();
    let rt: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let c = &rt["spec"]["containers"][0];
    let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(args[0], "serve");
    let help = crate::common::bin().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(&format!("{flag} ")), "`automm serve` has no {flag}:\n{help}");
    }
    let listen = args[args.iter().position(|a| *a == "--listen").unwrap() + 1];
    let port = c["ports"][0]["containerPort"].as_u64().unwrap();
    assert_eq!(listen, format!("0.0.0.0:{port}"));
    assert_eq!(c["readinessProbe"]["grpc"]["service"].as_str(), Some(automm::serve::V2_SERVICE));
    assert_eq!(rt["spec"]["protocolVersions"][0].as_str(), Some("grpc-v2"));
    let docker = std::fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    let cmd = docker.lines().find(|l| l.starts_with("CMD")).unwrap();
    for flag in cmd.split('"').filter(|a| a.starts_with("--")) {
        assert!(help.contains(&format!("{flag} ")), "Dockerfile CMD uses {flag}, which `automm serve` lacks");
    }
}
