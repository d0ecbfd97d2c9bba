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
    #[error("ONNX model {model}: node `{node}` ({op}): {msg}")]
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
    /// An ONNX error on `model`.
    pub fn onnx(model: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Onnx { model: model.into(), msg: msg.into() }
    }
}
