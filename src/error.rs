//! The library's error type: one enum, each variant naming the thing at fault and what was expected.

use std::path::PathBuf;

/// Every error the automm library returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A hyperparameter key or value is wrong.
    #[error("hyperparameter `{key}`: {msg}")]
    Config {
        /// The key as the user wrote it.
        key: String,
        /// What is wrong and what was expected.
        msg: String,
    },
    /// A table (CSV/Parquet) is unreadable or has the wrong shape.
    #[error("table {path}: {msg}")]
    Table {
        /// The table file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// An image cannot be read or decoded.
    #[error("image {path}{}: {msg}", row.map(|r| format!(" (row {r})")).unwrap_or_default())]
    Image {
        /// The image file (or a description of an in-memory image).
        path: PathBuf,
        /// The 1-based data row of the table that named it, when known.
        row: Option<usize>,
        /// What is wrong.
        msg: String,
    },
    /// An ONNX model cannot be loaded or run.
    #[error("ONNX model {model}: {msg}")]
    Onnx {
        /// The model file or a description.
        model: String,
        /// What is wrong.
        msg: String,
    },
    /// A tensor has the wrong shape or type.
    #[error("tensor `{name}`: {msg}")]
    Shape {
        /// The tensor's name.
        name: String,
        /// Expected vs found.
        msg: String,
    },
    /// A model folder is missing a file or holds a bad one.
    #[error("model {path}: {msg}")]
    Model {
        /// The model folder or file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// One node of an ONNX graph is malformed or unsupported.
    #[error("{}node `{node}` ({op}): {msg}", in_model(.model))]
    Node {
        /// The model file or a description.
        model: String,
        /// The node's name (or its first output when unnamed).
        node: String,
        /// Its op type.
        op: String,
        /// What is wrong and what was expected.
        msg: String,
    },
    /// ONNX Runtime cannot be found, loaded, or fails a session.
    #[error("{0}")]
    Runtime(String),
    /// A value could not be encoded or drawn (JSON, safetensors, SVG).
    #[error("encoding {what}: {msg}")]
    Encode {
        /// What was being written.
        what: String,
        /// The encoder's message.
        msg: String,
    },
    /// The gRPC server cannot start or serve (bind, TLS, runtime), or a client cannot reach it.
    #[error("server: {0}")]
    Server(String),
    /// Training failed (NaN loss, bad data split, ...).
    #[error("training: {0}")]
    Train(String),
    /// Training was stopped on request after a checkpoint was written; `automm train --resume` continues it.
    #[error("training stopped on request after epoch {epoch}; the checkpoint in {dir} resumes it")]
    Cancelled {
        /// The last finished (and checkpointed) epoch.
        epoch: usize,
        /// The checkpoint folder.
        dir: PathBuf,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn in_model(model: &str) -> String {
    if model.is_empty() {
        String::new()
    } else {
        format!("ONNX model {model}: ")
    }
}

/// Result with the library's error.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    /// A config error on `key`.
    pub fn config(key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { key: key.into(), msg: msg.into() }
    }
    /// An encoding error while writing `what`.
    pub fn encode(what: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Encode { what: what.into(), msg: msg.to_string() }
    }
    /// Names the model of a node error that does not say it yet (the graph that ran the node knows it).
    pub fn in_model(self, name: &str) -> Self {
        match self {
            Error::Node { model, node, op, msg } if model.is_empty() => {
                Error::Node { model: name.to_string(), node, op, msg }
            }
            other => other,
        }
    }
    /// An ONNX error on `model`.
    pub fn onnx(model: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Onnx { model: model.into(), msg: msg.into() }
    }
}

/// The gRPC status for a library error: bad input (hyperparameters, tables, images, tensor shapes) is the
/// caller's `INVALID_ARGUMENT`; everything else is the server's `INTERNAL`. The message is the error's.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        match e {
            Error::Config { .. } | Error::Table { .. } | Error::Image { .. } | Error::Shape { .. } => {
                tonic::Status::invalid_argument(e.to_string())
            }
            _ => tonic::Status::internal(e.to_string()),
        }
    }
}
