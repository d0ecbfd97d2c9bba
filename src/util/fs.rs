//! Files written so that a crash never leaves a half-written one: a temp file in the target's folder,
//! fsync, rename ([`write_atomic`], [`Staged`]); and the sha256 of a file (backbone provenance).

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically: a temp file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    stage_atomic(path, bytes)?.commit()
}

/// A complete, synced temp file waiting to be renamed over its target (the first half of
/// [`write_atomic`]). A crash before [`Staged::commit`] leaves the target untouched.
pub struct Staged {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl Staged {
    /// Renames the temp file over the target.
    pub fn commit(self) -> Result<()> {
        persist(self.tmp, &self.path)
    }
    /// The temp file's path (tests use it to simulate a crash that leaves it behind).
    pub fn temp_path(&self) -> &Path {
        self.tmp.path()
    }
    /// Leaves the temp file on disk without renaming it, as a crash would.
    pub fn abandon(self) -> Result<PathBuf> {
        let path = self.path;
        self.tmp.keep().map(|(_, p)| p).map_err(|e| Error::io(path, e.error))
    }
}

/// Writes and syncs `bytes` to a temp file next to `path`; [`Staged::commit`] puts it in place.
pub fn stage_atomic(path: &Path, bytes: &[u8]) -> Result<Staged> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // The target's extension too, so that tools that look at it (ONNX Runtime, viewers) accept the temp file.
    let suffix = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    let mut tmp =
        tempfile::Builder::new().prefix(".tmp").suffix(&suffix).tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    Ok(Staged { tmp, path: path.to_path_buf() })
}

/// Moves a finished temp file into place, readable like any other output (temp files are created 0600).
pub fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644));
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Pretty JSON of `value`; the error names `what`.
pub fn to_json<T: serde::Serialize>(value: &T, what: &str) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(|e| Error::encode(what, e))
}

/// Removes temp files [`stage_atomic`] left next to `target` (a process killed between write and rename)
/// that are older than `age`, so that they do not pile up; younger ones may belong to a writer still at
/// work. Returns how many were removed.
pub fn sweep_stale_temps(target: &Path, age: std::time::Duration) -> usize {
    let dir = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let suffix = target.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let stale = |e: &std::fs::DirEntry| {
        let name = e.file_name().to_string_lossy().into_owned();
        let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|d| d > age);
        name.starts_with(".tmp") && name.ends_with(&suffix) && old
    };
    entries.flatten().filter(stale).filter(|e| std::fs::remove_file(e.path()).is_ok()).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temp_files_of_a_target_are_swept_young_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("model.onnx");
        let staged = stage_atomic(&target, b"half").unwrap();
        let old = staged.abandon().unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options().write(true).open(&old).unwrap().set_modified(hour_ago).unwrap();
        let young = stage_atomic(&target, b"busy").unwrap().abandon().unwrap();
        let other = dir.path().join(".tmpkeep.csv");
        std::fs::write(&other, b"x").unwrap();
        std::fs::File::options().write(true).open(&other).unwrap().set_modified(hour_ago).unwrap();
        assert_eq!(sweep_stale_temps(&target, std::time::Duration::from_secs(3600)), 1);
        assert!(!old.exists() && young.exists() && other.exists());
    }
}
