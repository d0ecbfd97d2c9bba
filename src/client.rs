//! The Rust client of `automm serve`: `connect`, `predict` (encoded images or a preprocessed tensor),
//! `predict_table` (a whole table, batched), `fit` with a progress callback, `model_info` and `health`.

use std::collections::HashMap;

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::data::Table;
use crate::error::{Error, Result};
use crate::model::Predictions;
use crate::proto::inference_client::InferenceClient;
use crate::proto::{
    fit_event, FitEvent, FitRequest, FitResult, GetModelRequest, ModelInfo, PredictRequest, PredictResponse, Tensor,
};
use crate::util::progress::progress;

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone)]
pub struct Token(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

/// A connection to an automm server.
#[derive(Clone)]
pub struct Client {
    inner: InferenceClient<InterceptedService<Channel, Token>>,
    channel: Channel,
}

fn rpc_err(e: Status) -> Error {
    Error::Server(format!("server answered {:?}: {}", e.code(), e.message()))
}

impl Client {
    /// Connects to `url` (`http://host:port`, or `https://` for TLS with `ca_pem` as the trusted root),
    /// sending `token` as a bearer token when given.
    pub async fn connect(url: &str, token: Option<&str>, ca_pem: Option<&[u8]>) -> Result<Client> {
        let bad = |e: String| Error::Server(format!("cannot connect to {url}: {e}"));
        let mut ep = Endpoint::from_shared(url.to_string()).map_err(|e| bad(e.to_string()))?.tcp_nodelay(true);
        if let Some(ca) = ca_pem {
            let tls = ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
            ep = ep.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        }
        let channel = ep.connect().await.map_err(|e| bad(format!("{e} ({e:?})")))?;
        let token = match token {
            Some(t) => {
                Some(format!("Bearer {t}").parse().map_err(|_| bad("the token must be printable ASCII".into()))?)
            }
            None => None,
        };
        let inner = InferenceClient::with_interceptor(channel.clone(), Token(token))
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(256 << 20);
        Ok(Client { inner, channel })
    }

    /// Connects like [`Client::connect`] and waits up to `wait` for the server to answer health SERVING
    /// (retrying every 200 ms): a server started a moment ago is still loading its model.
    pub async fn connect_ready(
        url: &str,
        token: Option<&str>,
        ca_pem: Option<&[u8]>,
        wait: std::time::Duration,
    ) -> Result<Client> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let last = match Client::connect(url, token, ca_pem).await {
                Ok(c) => match c.health("").await {
                    Ok(true) => return Ok(c),
                    Ok(false) => "health says NOT_SERVING".to_string(),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if std::time::Instant::now() >= deadline {
                return Err(Error::Server(format!("{url} not ready after {wait:?}: {last}")));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Classifies encoded images (JPEG/PNG bytes).
    pub async fn predict(&self, images: Vec<Vec<u8>>) -> Result<PredictResponse> {
        self.predict_request(PredictRequest { images, tensor: None }, None).await
    }

    /// Classifies a preprocessed `[N, 3, S, S]` tensor (sent as `raw_data` bytes: one copy each way).
    pub async fn predict_tensor(&self, shape: Vec<i64>, data: Vec<f32>) -> Result<PredictResponse> {
        let raw_data = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.predict_request(
            PredictRequest { images: vec![], tensor: Some(Tensor { shape, data: vec![], raw_data }) },
            None,
        )
        .await
    }

    /// Sends a raw request with an optional deadline; the error keeps the gRPC status.
    pub async fn predict_request(
        &self,
        req: PredictRequest,
        timeout: Option<std::time::Duration>,
    ) -> Result<PredictResponse> {
        self.predict_status(req, timeout).await.map_err(rpc_err)
    }

    /// Like [`Client::predict_request`] but returns the gRPC status itself (for callers that branch on codes).
    pub async fn predict_status(
        &self,
        req: PredictRequest,
        timeout: Option<std::time::Duration>,
    ) -> std::result::Result<PredictResponse, Status> {
        let mut r = Request::new(req);
        if let Some(t) = timeout {
            r.set_timeout(t);
        }
        match self.inner.clone().predict(r).await {
            Ok(r) => Ok(r.into_inner()),
            // tonic's client reports its own expired deadline as CANCELLED; gRPC calls it DEADLINE_EXCEEDED.
            Err(s) if s.code() == tonic::Code::Cancelled && s.message() == "Timeout expired" => {
                Err(Status::deadline_exceeded("deadline exceeded (client side)"))
            }
            Err(s) => Err(s),
        }
    }

    /// Predicts every row of `table` through the server, `batch` images per request, with a progress bar
    /// (hidden when `quiet`); the server must return `classes` probabilities per image.
    pub async fn predict_table(&self, table: &Table, classes: usize, batch: usize, quiet: bool) -> Result<Predictions> {
        table.check_files()?;
        let pb = progress(table.rows.len() as u64, "predict", quiet);
        let (mut probs, mut preds) = (Vec::new(), Vec::new());
        for chunk in table.all_image_refs().chunks(batch.max(1)) {
            let images = chunk
                .iter()
                .map(|f| std::fs::read(&f.path).map_err(|e| Error::io(&f.path, e)))
                .collect::<Result<Vec<_>>>()?;
            for p in self.predict(images).await?.predictions {
                if p.probabilities.len() != classes {
                    return Err(Error::Shape {
                        name: "probabilities".into(),
                        msg: format!("the server returned {} for {classes} classes", p.probabilities.len()),
                    });
                }
                probs.extend(p.probabilities);
                preds.push(p.class_index as u32);
            }
            pb.inc(chunk.len() as u64);
        }
        pb.finish_and_clear();
        Ok(Predictions { probs, preds })
    }

    /// Describes the served model.
    pub async fn model_info(&self) -> Result<ModelInfo> {
        Ok(self.inner.clone().get_model(GetModelRequest {}).await.map_err(rpc_err)?.into_inner())
    }

    /// Trains on the server; `on_event` sees every progress event; returns the final result.
    pub async fn fit(
        &self,
        train_data: &str,
        label: &str,
        hyperparameters: HashMap<String, String>,
        mut on_event: impl FnMut(&FitEvent),
    ) -> Result<FitResult> {
        let req =
            FitRequest { train_data: train_data.into(), label: label.into(), hyperparameters, ..Default::default() };
        self.fit_request(req, &mut on_event).await.map_err(rpc_err)
    }

    /// Like [`Client::fit`] with a full request, returning the gRPC status on failure.
    pub async fn fit_request(
        &self,
        req: FitRequest,
        on_event: &mut impl FnMut(&FitEvent),
    ) -> std::result::Result<FitResult, Status> {
        let mut stream = self.inner.clone().fit(req).await?.into_inner();
        while let Some(ev) = stream.message().await? {
            on_event(&ev);
            if let Some(fit_event::Event::Result(r)) = ev.event {
                return Ok(r);
            }
        }
        Err(Status::unknown("the Fit stream ended without a result"))
    }

    /// The standard gRPC health check: true when the server reports SERVING (for `service`, "" = overall).
    pub async fn health(&self, service: &str) -> Result<bool> {
        use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
        let r = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest { service: service.into() })
            .await
            .map_err(rpc_err)?;
        Ok(r.into_inner().status == ServingStatus::Serving as i32)
    }
}
