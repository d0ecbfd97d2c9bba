//! `automm serve` in-process on a free 127.0.0.1 port with a model trained on the committed CNN fixture:
//! predictions equal `automm predict`, batching shows in the metrics, and every failure mode returns its
//! status code; Fit streams, hot-swaps and refuses a second concurrent Fit; shutdown drains.

use crate::common;
use common::fixture;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use automm::client::Client;
use automm::proto::PredictRequest;
use automm::serve::batcher::BatchConfig;
use automm::serve::{spawn, ServeConfig};
use tonic::Code;

/// Trains and exports a small model; returns (model folder, exported onnx, test table, data dir).
pub(crate) fn model(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let train = automm::app::synth::make_dataset(dir, "train", &[12, 8, 6, 4], 40, 5).unwrap();
    let test = automm::app::synth::make_dataset(dir, "test", &[3, 3, 3, 3], 40, 6).unwrap();
    let (hp, _) =
        automm::train::config::HyperParamsBuilder::new().set_str("optimization.max_epochs=2").unwrap().build().unwrap();
    let folder = dir.join("run");
    let req = common::train_request(train, folder.clone(), hp);
    automm::train::train(&req, |_| {}).unwrap();
    let onnx = dir.join("model.onnx");
    let opts = automm::deploy::export::ExportOptions {
        kind: automm::deploy::meta::ExportKind::Merged,
        opset: None,
        verify: false,
        verify_data: None,
        verify_images: 0,
        prior: None,
        backbone: None,
    };
    automm::deploy::export::export(&folder, &onnx, &opts).unwrap();
    (folder, onnx, test)
}

pub(crate) fn config(onnx: &Path, dir: &Path) -> ServeConfig {
    let mut c = ServeConfig::local(onnx, &dir.join("serve"));
    c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    c.batch = BatchConfig {
        max_batch_size: 16,
        max_queue_delay: Duration::from_millis(20),
        max_queue_size: 256,
        ..Default::default()
    };
    c.threads = 1;
    c.max_request_bytes = 4 << 20;
    c.data_root = Some(dir.to_path_buf());
    c.backbone = Some(fixture("cnn_fixture.onnx"));
    c
}

pub(crate) struct Server(pub(crate) automm::serve::Spawned);

pub(crate) async fn start(cfg: ServeConfig) -> Server {
    Server(
        tokio::time::timeout(Duration::from_secs(60), spawn(cfg))
            .await
            .expect("server start timed out")
            .expect("server failed to start"),
    )
}

impl Server {
    async fn client(&self, token: Option<&str>) -> Client {
        Client::connect(&self.0.url(), token, None).await.unwrap()
    }
    pub(crate) async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.0.running.metrics_addr.unwrap()).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
    pub(crate) async fn stop(self) {
        tokio::time::timeout(Duration::from_secs(30), self.0.stop()).await.expect("shutdown timed out").unwrap();
    }
}

fn metric(text: &str, name: &str) -> f64 {
    automm::serve::prometheus::parse_metric(text, name).unwrap_or_else(|| panic!("{name} missing in {text}"))
}

pub(crate) fn images(test: &Path) -> Vec<Vec<u8>> {
    let t = automm::data::Table::load(test, None, None).unwrap();
    t.rows.iter().map(|r| std::fs::read(&r.image).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_matches_local_batches_and_reports_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (folder, onnx, test) = model(dir.path());
    let server = start(config(&onnx, dir.path())).await;
    let client = server.client(None).await;
    assert!(client.health("").await.unwrap());
    let info = client.model_info().await.unwrap();
    assert_eq!(info.classes, ["circle", "ring", "square", "triangle"]);
    assert_eq!(info.input_size, 33);

    // Bytes: equal to the model folder's own predictions.
    let local = {
        let p = automm::deploy::predict::Predictor::load(&folder, &candle_core::Device::Cpu).unwrap();
        p.predict_table(&automm::data::Table::load(&test, None, None).unwrap(), true).unwrap()
    };
    let imgs = images(&test);
    let r = client.predict(imgs.clone()).await.unwrap();
    assert_eq!(r.predictions.len(), imgs.len());
    assert!(r.model_version.starts_with("1-"));
    let got: Vec<f32> = r.predictions.iter().flat_map(|p| p.probabilities.clone()).collect();
    let d = got.iter().zip(&local.probs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(d <= 1e-4, "server vs local: {d}");
    let labels: Vec<u32> = r.predictions.iter().map(|p| p.class_index as u32).collect();
    assert_eq!(labels, local.preds);

    // Tensor input: preprocessed locally, same answer.
    let pp = automm::data::Preprocess::new(33, automm::data::Normalization::imagenet());
    let x = pp.bytes_to_chw(&imgs[0], Path::new("x")).unwrap();
    let r = client.predict_tensor(vec![1, 3, 33, 33], x).await.unwrap();
    let d = r.predictions[0].probabilities.iter().zip(&local.probs[..4]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(d <= 1e-4, "tensor: {d}");

    // Many concurrent single-image requests are batched: fewer executions than requests.
    let before = server.metrics().await;
    let client = Arc::new(client);
    let mut tasks = Vec::new();
    for i in 0..48 {
        let c = client.clone();
        let img = imgs[i % imgs.len()].clone();
        tasks.push(tokio::spawn(async move { c.predict(vec![img]).await.map(|r| r.predictions.len()) }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 1);
    }
    let after = server.metrics().await;
    let execs = metric(&after, "automm_execution_count_total") - metric(&before, "automm_execution_count_total");
    let items = metric(&after, "automm_inference_count_total") - metric(&before, "automm_inference_count_total");
    assert_eq!(items, 48.0);
    assert!(execs < 48.0, "no batching: {execs} executions for 48 requests");
    eprintln!("48 concurrent requests -> {execs} executions (average batch {:.1})", items / execs);
    assert!(metric(&after, "automm_request_success_total") >= 50.0);
    assert_eq!(metric(&after, "automm_queue_depth"), 0.0);
    server.stop().await;
}

/// Sends `body` as the Predict message as it is (no protobuf encoding), with the test's token.
async fn raw_predict(url: &str, body: Vec<u8>) -> Result<(), tonic::Status> {
    #[derive(Default)]
    struct Raw;
    impl tonic::codec::Encoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
            bytes::BufMut::put_slice(dst, &item);
            Ok(())
        }
    }
    impl tonic::codec::Decoder for Raw {
        type Item = ();
        type Error = tonic::Status;
        fn decode(&mut self, _: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
            Ok(Some(()))
        }
    }
    impl tonic::codec::Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = ();
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }
    let channel = tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(body);
    req.metadata_mut().insert("authorization", "Bearer s3cret-0123456789abcdef".parse().unwrap());
    let path = http::uri::PathAndQuery::from_static("/automm.v1.Inference/Predict");
    grpc.unary(req, path, Raw).await.map(|_| ())
}

/// An empty or short bearer token is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_or_short_tokens_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = dir.path().join("missing.onnx");
    for token in ["", "   ", "short"] {
        let mut cfg = config(&onnx, dir.path());
        cfg.auth_token = Some(token.into());
        let e = spawn(cfg).await.err().expect("a server with a short token started").to_string();
        assert!(e.contains("--auth-token-file") && e.contains("at least 16"), "{e}");
    }
}

/// A Fit never reuses the folder of an earlier run, also after a restart (a fresh counter).
#[test]
fn fit_run_folders_skip_those_of_earlier_servers() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("serve");
    std::fs::create_dir_all(work.join("fit-1")).unwrap();
    std::fs::write(work.join("fit-1/config.json"), "{}").unwrap();
    std::fs::create_dir_all(work.join("fit-7/checkpoint")).unwrap();
    let counter = std::sync::atomic::AtomicU64::new(0);
    let (n, path) = automm::serve::fresh_run_dir(&work, &counter).unwrap();
    assert_eq!((n, path.clone()), (8, work.join("fit-8")));
    assert!(path.is_dir() && std::fs::read_dir(&path).unwrap().next().is_none());
    assert_eq!(automm::serve::fresh_run_dir(&work, &counter).unwrap().0, 9);
    assert_eq!(std::fs::read_to_string(work.join("fit-1/config.json")).unwrap(), "{}", "an earlier run was touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_return_their_status_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, onnx, test) = model(dir.path());
    let imgs = images(&test);
    let mut cfg = config(&onnx, dir.path());
    cfg.auth_token = Some("s3cret-0123456789abcdef".into());
    cfg.max_request_bytes = 20_000;
    let server = start(cfg).await;
    let code = |r: Result<automm::proto::PredictResponse, tonic::Status>| r.err().map(|s| s.code());

    let none = server.client(None).await;
    assert_eq!(
        code(none.predict_status(PredictRequest { images: vec![imgs[0].clone()], tensor: None }, None).await),
        Some(Code::Unauthenticated)
    );
    let wrong = server.client(Some("guess")).await;
    assert_eq!(
        code(wrong.predict_status(PredictRequest { images: vec![imgs[0].clone()], tensor: None }, None).await),
        Some(Code::Unauthenticated)
    );
    let c = server.client(Some("s3cret-0123456789abcdef")).await;
    assert!(c.predict(vec![imgs[0].clone()]).await.is_ok());

    // A bad image names its index.
    let r = c
        .predict_status(PredictRequest { images: vec![imgs[0].clone(), b"not an image".to_vec()], tensor: None }, None)
        .await;
    let s = r.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("image 1"), "{}", s.message());
    // A wrong tensor shape says the expected one.
    let s = c
        .predict_status(
            PredictRequest {
                images: vec![],
                tensor: Some(automm::proto::Tensor {
                    shape: vec![1, 3, 32, 32],
                    data: vec![0.0; 3072],
                    raw_data: vec![],
                }),
            },
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("[N, 3, 33, 33]"), "{}", s.message());
    let s = c.predict_status(PredictRequest::default(), None).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    // Too big a request.
    let s = c.predict_status(PredictRequest { images: vec![vec![0u8; 50_000]], tensor: None }, None).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    // More items than --max-batch-size (16): refused before any decoding, naming the limit (one-pixel PNGs,
    // the 14 KB request that took gigabytes).
    let pixel = {
        let mut buf = std::io::Cursor::new(Vec::new());
        image::RgbImage::new(1, 1).write_to(&mut buf, image::ImageFormat::Png).unwrap();
        buf.into_inner()
    };
    let s = c.predict_status(PredictRequest { images: vec![pixel; 17], tensor: None }, None).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    assert!(s.message().contains("17 images") && s.message().contains("at most 16"), "{}", s.message());
    // An aspect-ratio bomb (a 16384x1 PNG) is answered quickly.
    let bomb = {
        let mut buf = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(16384, 1, image::Rgb([200, 10, 10]))
            .write_to(&mut buf, image::ImageFormat::Png)
            .unwrap();
        buf.into_inner()
    };
    let t0 = std::time::Instant::now();
    assert!(c.predict(vec![bomb]).await.is_ok());
    assert!(t0.elapsed() < Duration::from_secs(10), "16384x1 PNG took {:?}", t0.elapsed());
    // A grpc-timeout header longer than the spec's 8 digits is ignored, not a panic.
    let mut raw = automm::proto::inference_client::InferenceClient::connect(server.0.url()).await.unwrap();
    let mut r = tonic::Request::new(PredictRequest { images: vec![imgs[0].clone()], tensor: None });
    r.metadata_mut().insert("grpc-timeout", "999999999999H".parse().unwrap());
    r.metadata_mut().insert("authorization", "Bearer s3cret-0123456789abcdef".parse().unwrap());
    assert!(raw.predict(r).await.is_ok());
    // Bytes that are not a PredictRequest: the caller's error, not the server's.
    let s = raw_predict(&server.0.url(), b"\xff\xff\xff\x0f not protobuf".to_vec()).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    // Non-finite tensor values are the caller's error.
    let s = c
        .predict_status(
            PredictRequest {
                images: vec![],
                tensor: Some(automm::proto::Tensor {
                    shape: vec![1, 3, 33, 33],
                    data: vec![f32::INFINITY; 3 * 33 * 33],
                    raw_data: vec![],
                }),
            },
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    // The server keeps serving after all of that.
    assert!(c.predict(vec![imgs[1].clone()]).await.is_ok());
    let m = server.metrics().await;
    assert!(metric(&m, "automm_request_failure_total") >= 3.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_a_full_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (_, onnx, test) = model(dir.path());
    let imgs = images(&test);
    // A long batching window: a request with a short deadline expires while queued.
    let mut cfg = config(&onnx, dir.path());
    cfg.batch = BatchConfig {
        max_batch_size: 1000,
        max_queue_delay: Duration::from_millis(600),
        max_queue_size: 256,
        ..Default::default()
    };
    let server = start(cfg).await;
    let c = server.client(None).await;
    let s = c
        .predict_status(
            PredictRequest { images: vec![imgs[0].clone()], tensor: None },
            Some(Duration::from_millis(100)),
        )
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::DeadlineExceeded, "{s:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The server dropped the expired request before compute and counted it as failed.
    let m = server.metrics().await;
    assert_eq!(metric(&m, "automm_inference_count_total"), 0.0);
    assert_eq!(metric(&m, "automm_request_failure_total"), 1.0);
    server.stop().await;

    // A one-slot queue with one-item batches: a burst overflows it at once.
    let mut cfg = config(&onnx, dir.path());
    cfg.batch = BatchConfig {
        max_batch_size: 1,
        max_queue_delay: Duration::from_millis(0),
        max_queue_size: 1,
        ..Default::default()
    };
    let server = start(cfg).await;
    let c = Arc::new(server.client(None).await);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let c = c.clone();
        let img = imgs[i % imgs.len()].clone();
        tasks.push(tokio::spawn(async move {
            c.predict_status(PredictRequest { images: vec![img], tensor: None }, None).await
        }));
    }
    let (mut ok, mut full) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::ResourceExhausted => full += 1,
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    assert!(full > 0 && ok > 0, "ok {ok}, queue full {full}");
    server.stop().await;
}

/// Image files of a table, resolved.
fn images_of(table: &Path) -> Vec<PathBuf> {
    automm::data::Table::load(table, None, None).unwrap().rows.into_iter().map(|r| r.image).collect()
}

/// `target` relative to `base` through `..` (both absolute).
fn pathdiff(target: &Path, base: &Path) -> String {
    let ups = base.components().count() - 1;
    format!("{}{}", "../".repeat(ups), target.strip_prefix("/").unwrap().display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fit_streams_hot_swaps_and_refuses_a_second_fit() {
    let dir = tempfile::tempdir().unwrap();
    let (_, onnx, test) = model(dir.path());
    // An earlier server process's finished run: a Fit after the restart must not touch it.
    let earlier = dir.path().join("serve/fit-1");
    std::fs::create_dir_all(&earlier).unwrap();
    std::fs::write(earlier.join("config.json"), "an earlier run").unwrap();
    let server = start(config(&onnx, dir.path())).await;
    let c = server.client(None).await;
    let v0 = c.model_info().await.unwrap().version;
    let hp: std::collections::HashMap<String, String> = [
        ("optimization.max_epochs".to_string(), "3".to_string()),
        ("optimization.loss_function".into(), "focal_loss".into()),
    ]
    .into();
    // Escaping the data root is refused.
    let s = c
        .fit_request(
            automm::proto::FitRequest {
                train_data: "../etc/passwd".into(),
                label: "label".into(),
                ..Default::default()
            },
            &mut |_| {},
        )
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    // A table inside the root whose image paths lead outside it (`..`, absolute, symlink) is refused too.
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.png");
    std::fs::copy(&images_of(&test)[0], &secret).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&secret, dir.path().join("link.png")).unwrap();
    let rel = pathdiff(&secret, dir.path());
    for (name, image) in [("abs.csv", secret.display().to_string()), ("up.csv", rel), ("link.csv", "link.png".into())] {
        std::fs::write(dir.path().join(name), format!("image,label\n{image},circle\n")).unwrap();
        let s = c
            .fit_request(
                automm::proto::FitRequest { train_data: name.into(), label: "label".into(), ..Default::default() },
                &mut |_| {},
            )
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{name}: {s:?}");
        assert!(s.message().contains("row 1") && s.message().contains("data root"), "{}", s.message());
    }
    // Two at once: the second is refused while the first runs.
    let c2 = c.clone();
    let hp2 = hp.clone();
    let first = tokio::spawn(async move {
        let mut events = Vec::new();
        let r = c2.fit("train.csv", "label", hp2, |e| events.push(e.clone())).await;
        (r, events)
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let second = c
        .fit_request(
            automm::proto::FitRequest { train_data: "train.csv".into(), label: "label".into(), ..Default::default() },
            &mut |_| {},
        )
        .await;
    let (r, events) = first.await.unwrap();
    let r = r.unwrap();
    assert_eq!(second.unwrap_err().code(), Code::FailedPrecondition);
    let epochs = events.iter().filter(|e| matches!(e.event, Some(automm::proto::fit_event::Event::Epoch(_)))).count();
    let phases: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(automm::proto::fit_event::Event::Phase(p)) => Some(p.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(epochs, 3);
    assert!(phases.contains(&"features".to_string()) && phases.contains(&"swap".to_string()), "{phases:?}");
    assert!(r.metrics.contains_key("balanced_accuracy"));
    assert!(r.model_version.starts_with("fit-2-"), "{}", r.model_version);
    assert_eq!(std::fs::read_to_string(earlier.join("config.json")).unwrap(), "an earlier run");
    // New requests use the new model.
    let info = c.model_info().await.unwrap();
    assert_ne!(info.version, v0);
    assert_eq!(info.version, r.model_version);
    let p = c.predict(images(&test)[..2].to_vec()).await.unwrap();
    assert_eq!(p.model_version, r.model_version);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_requests_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (_, onnx, test) = model(dir.path());
    let imgs = images(&test);
    let mut cfg = config(&onnx, dir.path());
    cfg.batch = BatchConfig {
        max_batch_size: 1000,
        max_queue_delay: Duration::from_millis(300),
        max_queue_size: 256,
        ..Default::default()
    };
    let server = start(cfg).await;
    let c = Arc::new(server.client(None).await);
    let mut tasks = Vec::new();
    for img in imgs.iter().take(8).cloned() {
        let c = c.clone();
        tasks.push(tokio::spawn(async move { c.predict(vec![img]).await }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await; // queued, waiting for the batch window
    server.stop().await;
    for t in tasks {
        assert!(t.await.unwrap().is_ok(), "a request in flight was dropped at shutdown");
    }
}

/// A short mixed soak against a separate `automm serve` process: every answer has its expected status,
/// the queue drains and SIGTERM exits 0 (`automm bench soak` runs the same for 10 minutes).
#[test]
fn mixed_soak_against_a_server_process() {
    let dir = tempfile::tempdir().unwrap();
    let (_, onnx, _) = model(dir.path());
    let r = automm::app::bench::mixed_soak(Path::new(env!("CARGO_BIN_EXE_automm")), &onnx, 4, 3.0, 1.0).unwrap();
    assert!(r.passed(), "{r:#?}");
    assert!(r.good.sent > 0 && r.bad_image.sent > 0, "{r:#?}");
    assert_eq!(r.bad_image.outcomes.get("InvalidArgument"), Some(&r.bad_image.sent));
    // The hostile probes: a 200-item burst refused, a 16384x1 PNG answered, SIGTERM within the default
    // 5 s shutdown timeout although a half-open connection is open.
    assert_eq!(r.probes.burst_status, "ResourceExhausted", "{r:#?}");
    assert_eq!(r.probes.bomb_status, "Ok", "{r:#?}");
    assert!(r.probes.sigterm_seconds < 10.0, "{r:#?}");
    eprintln!("soak probes: {:?}", r.probes);
}

/// Shutdown ends within its timeout although a client holds a half-open connection (the HTTP/2 preface
/// never finished) and another a `grpc.health.v1` Watch stream; the Watch sees NOT_SERVING first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_in_time_with_a_half_open_connection_and_a_watch_stream() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let (_, onnx, _) = model(dir.path());
    let mut cfg = config(&onnx, dir.path());
    cfg.shutdown_timeout = Duration::from_secs(1);
    let server = start(cfg).await;
    let mut half_open = tokio::net::TcpStream::connect(server.0.running.addr).await.unwrap();
    half_open.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(server.0.url()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut watch =
        health.watch(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let t0 = std::time::Instant::now();
    server.stop().await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    eprintln!("shutdown with a half-open connection and a Watch stream: {took:?}");
    let mut saw_not_serving = false;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    while let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_secs(5), watch.message()).await {
        saw_not_serving |= m.status == not_serving;
    }
    assert!(saw_not_serving, "the Watch stream never saw NOT_SERVING");
    drop(half_open);
}

/// The decoded input of the requests in flight is bounded: a request that would pass
/// `max_inflight_bytes` is refused before decoding, and the budget is given back afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflight_bytes_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (_, onnx, test) = model(dir.path());
    let imgs = images(&test);
    let mut cfg = config(&onnx, dir.path());
    // One 33x33 image decodes to 3 * 33 * 33 float32 = 13,068 bytes.
    cfg.max_inflight_bytes = 20_000;
    let server = start(cfg).await;
    let c = server.client(None).await;
    let two = PredictRequest { images: vec![imgs[0].clone(), imgs[1].clone()], tensor: None };
    let s = c.predict_status(two, None).await.unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    assert!(s.message().contains("--max-inflight-bytes") && s.message().contains("26136"), "{}", s.message());
    for _ in 0..3 {
        assert!(c.predict(vec![imgs[0].clone()]).await.is_ok(), "the budget was not given back");
    }
    server.stop().await;
}

/// A connection that stays silent after a partial HTTP/2 preface is dropped after the handshake timeout,
/// while the server keeps serving others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_dropped_after_the_handshake_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (_, onnx, test) = model(dir.path());
    let mut cfg = config(&onnx, dir.path());
    cfg.handshake_timeout = Duration::from_millis(300);
    let server = start(cfg).await;
    let mut silent = tokio::net::TcpStream::connect(server.0.running.addr).await.unwrap();
    silent.write_all(b"PRI * HTTP").await.unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the silent connection was still open after 5 s");
    assert!(t0.elapsed() >= Duration::from_millis(250), "closed before the timeout: {:?}", t0.elapsed());
    let c = server.client(None).await;
    assert!(c.predict(images(&test)[..1].to_vec()).await.is_ok());
    server.stop().await;
}

/// Lists the services through server reflection version `alpha` (v1alpha when true, else v1).
async fn reflected_services(url: &str, alpha: bool) -> Vec<String> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    macro_rules! list {
        ($m:ident) => {{
            use tonic_reflection::pb::$m::{
                server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse, ServerReflectionRequest,
            };
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut stream = ServerReflectionClient::new(channel)
                .server_reflection_info(tokio_stream::iter([req]))
                .await
                .unwrap()
                .into_inner();
            match stream.message().await.unwrap().unwrap().message_response {
                Some(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect(),
                other => panic!("unexpected reflection answer {other:?}"),
            }
        }};
    }
    if alpha {
        list!(v1alpha)
    } else {
        list!(v1)
    }
}

/// grpcurl before 1.8.8 (PyPI's 1.8.6) speaks only reflection v1alpha; both versions list our service.
/// `connect_ready` (the client's `--wait`) fails with a clear message when nothing answers in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_and_v1alpha_and_a_readiness_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (_folder, onnx, _test) = model(dir.path());
    let server = start(config(&onnx, dir.path())).await;
    for alpha in [false, true] {
        let names = reflected_services(&server.0.url(), alpha).await;
        assert!(names.iter().any(|n| n == "automm.v1.Inference"), "alpha={alpha}: {names:?}");
    }
    let c = Client::connect_ready(&server.0.url(), None, None, Duration::from_secs(5)).await.unwrap();
    assert!(c.health("").await.unwrap());
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let url = format!("http://{free}");
    let Err(e) = Client::connect_ready(&url, None, None, Duration::from_millis(500)).await else {
        panic!("nothing listens on {url}, yet connect_ready succeeded")
    };
    let e = e.to_string();
    assert!(e.contains("not ready after"), "{e}");
    server.stop().await;
}
