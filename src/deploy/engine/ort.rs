//! ONNX Runtime through `ort` (load-dynamic: nothing is linked or downloaded at build time). The library
//! is looked up in this order: `ORT_DYLIB_PATH`; next to the executable; Python's `onnxruntime` package
//! (`pip install onnxruntime==1.31.1` ships `capi/libonnxruntime.so.1.31.1`). When none is found the
//! error says how to get one; `ort::init()` would panic instead, so it is never called.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::session::Session;
use ort::value::Tensor as OrtTensor;

use crate::error::{Error, Result};

/// How to get the library, appended to every "not found" error.
pub const HOW_TO_GET_ORT: &str =
    "install it with `python3 -m pip install onnxruntime==1.31.1` (automm then finds it through python3), \
or set ORT_DYLIB_PATH to a libonnxruntime.so (1.17 or newer), or put libonnxruntime.so.1 next to the automm binary";

/// Where the ONNX Runtime library was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrtLocation {
    /// The library file.
    pub path: PathBuf,
    /// How it was found (`ORT_DYLIB_PATH`, `next to the binary`, `python onnxruntime package`).
    pub source: &'static str,
}

fn is_ort_lib(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        n.starts_with("libonnxruntime.so")
            || n == "onnxruntime.dll"
            || n.starts_with("libonnxruntime.") && n.ends_with(".dylib")
    }) && !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains("providers"))
}

/// The library in `dir`, preferring the most specific versioned file name.
fn lib_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> =
        std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).filter(|p| p.is_file() && is_ort_lib(p)).collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    found.into_iter().next()
}

fn python_onnxruntime_dir() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import importlib.util as u, os; s = u.find_spec('onnxruntime'); print(os.path.dirname(s.origin) if s and s.origin else '')"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!s.is_empty()).then(|| PathBuf::from(s).join("capi"))
}

/// Finds the library without loading it.
pub fn locate() -> Result<OrtLocation> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(OrtLocation { path: p, source: "ORT_DYLIB_PATH" });
        }
        return Err(Error::Runtime(format!(
            "ONNX Runtime library not found: ORT_DYLIB_PATH={} is not a file; {HOW_TO_GET_ORT}",
            p.display()
        )));
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        if let Some(p) = lib_in(&dir).or_else(|| lib_in(&dir.join("lib"))) {
            return Ok(OrtLocation { path: p, source: "next to the binary" });
        }
    }
    if let Some(p) = python_onnxruntime_dir().and_then(|d| lib_in(&d)) {
        return Ok(OrtLocation { path: p, source: "python onnxruntime package" });
    }
    Err(Error::Runtime(format!(
        "ONNX Runtime library not found (looked at ORT_DYLIB_PATH, next to the automm binary, and python3's onnxruntime package); {HOW_TO_GET_ORT}"
    )))
}

struct Runtime {
    env: ort::environment::Environment,
    location: OrtLocation,
}

static RUNTIME: OnceLock<std::result::Result<Runtime, String>> = OnceLock::new();

fn runtime() -> Result<&'static Runtime> {
    RUNTIME
        .get_or_init(|| {
            let location = locate().map_err(|e| e.to_string())?;
            let builder = ort::init_from(&location.path).map_err(|e| {
                format!(
                    "cannot load ONNX Runtime from {} (found via {}): {e}; {HOW_TO_GET_ORT}",
                    location.path.display(),
                    location.source
                )
            })?;
            let env = builder.with_name("automm").build().map_err(|e| format!("ONNX Runtime environment: {e}"))?;
            tracing::debug!("ONNX Runtime loaded from {} ({})", location.path.display(), location.source);
            Ok(Runtime { env, location })
        })
        .as_ref()
        .map_err(|e| Error::Runtime(e.clone()))
}

/// The loaded library's location and build info (loads it on first call).
pub fn loaded() -> Result<(OrtLocation, String)> {
    let r = runtime()?;
    Ok((r.location.clone(), ort::info().to_string()))
}

/// One input tensor for [`OrtSession::run`].
#[derive(Debug, Clone)]
pub enum Feed {
    /// float32 `(shape, data)`.
    F32(Vec<usize>, Vec<f32>),
    /// uint8 `(shape, data)`.
    U8(Vec<usize>, Vec<u8>),
    /// int64 `(shape, data)` (indices, token ids).
    I64(Vec<usize>, Vec<i64>),
}

fn to_i64(shape: &[usize]) -> Vec<i64> {
    shape.iter().map(|&d| d as i64).collect()
}

/// An ONNX Runtime session over one model file.
pub struct OrtSession {
    session: Mutex<Session>,
    /// Input names in graph order.
    pub inputs: Vec<String>,
    /// Output names in graph order.
    pub outputs: Vec<String>,
}

fn ort_err(model: &Path, e: impl std::fmt::Display) -> Error {
    Error::onnx(model.display().to_string(), format!("ONNX Runtime: {e}"))
}

impl OrtSession {
    /// Opens `model` on the CPU with `threads` intra-op threads (0 = ORT's default: all cores).
    pub fn open(model: &Path, threads: usize) -> Result<OrtSession> {
        Self::open_with(model, threads, false, true)
    }

    /// Opens `model`; with `cuda` (and automm built with `--features cuda`) registers the CUDA execution
    /// provider first and falls back to the CPU, logging why once, when it cannot load. `spin` keeps ORT's
    /// default of intra-op threads spinning between runs; a server turns it off so the idle threads leave
    /// the cores to request decoding and the network.
    pub fn open_with(model: &Path, threads: usize, cuda: bool, spin: bool) -> Result<OrtSession> {
        let rt = runtime()?;
        let mut b = Session::builder(&rt.env).map_err(|e| ort_err(model, e))?;
        if threads > 0 {
            b = b.with_intra_threads(threads).map_err(|e| ort_err(model, e))?;
        }
        if !spin {
            b = b.with_intra_op_spinning(false).map_err(|e| ort_err(model, e))?;
        }
        if cuda {
            b = register_cuda(b);
        }
        let session = b.commit_from_file(model).map_err(|e| ort_err(model, e))?;
        let inputs = session.inputs().iter().map(|o| o.name().to_string()).collect();
        let outputs = session.outputs().iter().map(|o| o.name().to_string()).collect();
        Ok(OrtSession { session: Mutex::new(session), inputs, outputs })
    }

    /// Runs on float32 inputs `(name, shape, data)` and returns every float32 output as `(shape, data)`.
    pub fn run_f32(&self, feeds: &[(&str, &[usize], &[f32])]) -> Result<Vec<(Vec<usize>, Vec<f32>)>> {
        self.run(feeds.iter().map(|(n, s, d)| (*n, Feed::F32(s.to_vec(), d.to_vec()))).collect())
    }

    /// Runs on typed inputs and returns every float32 output as `(shape, data)`.
    pub fn run(&self, feeds: Vec<(&str, Feed)>) -> Result<Vec<(Vec<usize>, Vec<f32>)>> {
        let mut values = Vec::with_capacity(feeds.len());
        for (name, feed) in feeds {
            let bad = |e: ort::Error| Error::Shape { name: name.to_string(), msg: e.to_string() };
            let v: ort::session::SessionInputValue = match feed {
                Feed::F32(shape, data) => OrtTensor::from_array((to_i64(&shape), data)).map_err(bad)?.into(),
                Feed::U8(shape, data) => OrtTensor::from_array((to_i64(&shape), data)).map_err(bad)?.into(),
                Feed::I64(shape, data) => OrtTensor::from_array((to_i64(&shape), data)).map_err(bad)?.into(),
            };
            values.push((std::borrow::Cow::<str>::from(name.to_string()), v));
        }
        let mut s = self.session.lock().map_err(|_| Error::Runtime("ONNX Runtime session lock poisoned".into()))?;
        let out = s.run(values).map_err(|e| Error::Runtime(format!("ONNX Runtime run: {e}")))?;
        let mut res = Vec::new();
        for name in &self.outputs {
            let (shape, data) = out[name.as_str()]
                .try_extract_tensor::<f32>()
                .map_err(|e| Error::Shape { name: name.clone(), msg: e.to_string() })?;
            res.push((shape.iter().map(|&d| d.max(0) as usize).collect(), data.to_vec()));
        }
        Ok(res)
    }
}

static CUDA_FALLBACK_LOGGED: std::sync::Once = std::sync::Once::new();

#[cfg(feature = "ort-cuda")]
fn register_cuda(mut b: ort::session::builder::SessionBuilder) -> ort::session::builder::SessionBuilder {
    use ort::ep::ExecutionProvider;
    let ep = ort::ep::CUDA::default();
    match ep.register(&mut b) {
        Ok(()) => b,
        Err(e) => {
            CUDA_FALLBACK_LOGGED.call_once(|| {
                tracing::warn!("ONNX Runtime's CUDA execution provider cannot load ({e}); running on the CPU. It needs onnxruntime-gpu with CUDA 13 and cuDNN 9 libraries.")
            });
            b
        }
    }
}

#[cfg(not(feature = "ort-cuda"))]
fn register_cuda(b: ort::session::builder::SessionBuilder) -> ort::session::builder::SessionBuilder {
    CUDA_FALLBACK_LOGGED.call_once(|| {
        tracing::warn!(
            "env.num_gpus asks for a GPU but automm was built without `--features cuda`; ONNX Runtime runs on the CPU"
        )
    });
    b
}

/// Whether ONNX Runtime's CUDA execution provider is usable here, in words.
pub fn cuda_status() -> String {
    #[cfg(feature = "ort-cuda")]
    {
        use ort::ep::ExecutionProvider;
        if let Err(e) = runtime() {
            return format!("unknown ({e})");
        }
        match ort::ep::CUDA::is_available() {
            Ok(true) => "available".into(),
            Ok(false) => "not in this ONNX Runtime build (the CPU wheel; install onnxruntime-gpu)".into(),
            Err(e) => format!("unknown ({e})"),
        }
    }
    #[cfg(not(feature = "ort-cuda"))]
    {
        "not compiled in (build with --features ort-cuda or cuda)".into()
    }
}
