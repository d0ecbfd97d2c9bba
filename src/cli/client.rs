//! `automm client`: calls an automm server (health, model info, predict, fit).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use automm::data::Table;
use automm::deploy::predict::write_predictions;

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Server URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// File holding the bearer token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for https:// servers.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// Wait up to this many seconds for the server to be ready (health SERVING) before calling it.
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    pub wait: f64,
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Predict a table of images through the server and write a CSV like `automm predict`.
    Predict {
        #[command(flatten)]
        server: ServerArgs,
        /// Table of images.
        #[arg(long)]
        data: PathBuf,
        /// Output CSV.
        #[arg(long)]
        output: PathBuf,
        /// Images per request.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
    },
    /// Train on the server (paths relative to its --data-root) and hot-swap the new model in.
    Fit {
        #[command(flatten)]
        server: ServerArgs,
        /// Training table, relative to the server's data root.
        #[arg(long)]
        train_data: String,
        /// Label column.
        #[arg(long)]
        label: String,
        /// Validation table, relative to the server's data root.
        #[arg(long)]
        tuning_data: Option<String>,
        /// Hyperparameter KEY=VALUE (repeatable).
        #[arg(long = "hp")]
        hp: Vec<String>,
    },
    /// Check the server's health.
    Health {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Describe the served model.
    Info {
        #[command(flatten)]
        server: ServerArgs,
    },
}

async fn connect(s: &ServerArgs) -> Result<automm::client::Client> {
    let token = match &s.token_file {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim().to_string())
        }
        None => None,
    };
    let ca = match &s.ca_cert {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    if s.wait > 0.0 {
        let wait = std::time::Duration::try_from_secs_f64(s.wait).context("--wait: seconds must be finite")?;
        return Ok(automm::client::Client::connect_ready(&s.server, token.as_deref(), ca.as_deref(), wait).await?);
    }
    Ok(automm::client::Client::connect(&s.server, token.as_deref(), ca.as_deref()).await?)
}

pub async fn cmd_client(c: ClientCommand) -> Result<()> {
    match c {
        ClientCommand::Health { server } => {
            let ok = connect(&server).await?.health("").await?;
            println!("{}", if ok { "SERVING" } else { "NOT_SERVING" });
            if !ok {
                anyhow::bail!("the server is not serving");
            }
        }
        ClientCommand::Info { server } => {
            let i = connect(&server).await?.model_info().await?;
            println!(
                "version {}  engine {}  input `{}` [N, 3, {}, {}]  max batch {}",
                i.version, i.engine, i.input_name, i.input_size, i.input_size, i.max_batch_size
            );
            println!("classes {:?}\npreprocessing {}", i.classes, i.preprocessing_json);
        }
        ClientCommand::Predict { server, data, output, batch_size } => {
            let client = connect(&server).await?;
            let info = client.model_info().await?;
            let table = Table::load(&data, None, None)?;
            let p = client.predict_table(&table, info.classes.len(), batch_size, false).await?;
            write_predictions(&table, &info.classes, &p, &output)?;
            println!("wrote {} predictions to {} (model version {})", table.rows.len(), output.display(), info.version);
        }
        ClientCommand::Fit { server, train_data, label, tuning_data, hp } => {
            let client = connect(&server).await?;
            let mut hps = std::collections::HashMap::new();
            for kv in &hp {
                let (k, v) = kv.split_once('=').with_context(|| format!("--hp {kv}: expected KEY=VALUE"))?;
                hps.insert(k.trim().to_string(), v.trim().to_string());
            }
            let pb = indicatif::ProgressBar::new_spinner();
            pb.enable_steady_tick(std::time::Duration::from_millis(200));
            let req = automm::proto::FitRequest {
                train_data,
                label,
                tuning_data: tuning_data.unwrap_or_default(),
                hyperparameters: hps,
                ..Default::default()
            };
            let r = client
                .fit_request(req, &mut |ev| match &ev.event {
                    Some(automm::proto::fit_event::Event::Phase(p)) => pb.set_message(format!("phase: {p}")),
                    Some(automm::proto::fit_event::Event::Epoch(e)) => pb.set_message(format!(
                        "epoch {} loss {:.4} {} {:.3}",
                        e.epoch, e.train_loss, e.val_metric, e.val_score
                    )),
                    _ => {}
                })
                .await
                .map_err(|s| anyhow::anyhow!("Fit failed: {:?}: {}", s.code(), s.message()))?;
            pb.finish_and_clear();
            println!("new model version {} (best epoch {})", r.model_version, r.best_epoch);
            let mut m: Vec<_> = r.metrics.into_iter().collect();
            m.sort_by(|a, b| a.0.cmp(&b.0));
            for (k, v) in m {
                println!("{k:<18} {v:.4}");
            }
        }
    }
    Ok(())
}
