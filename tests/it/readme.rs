//! README.md's commands, run as written: every ```sh block of the README, in order, as one bash script in
//! a scratch folder that holds the repository's `data/` and `models/` (so runs, venvs and predictions land
//! there, not in the checkout). The README and this test therefore cannot drift apart.
//!
//! What the harness changes, and why:
//! - `cargo build`/`cargo install`/`cargo test` lines print that they are skipped: this test runs inside
//!   the build they make. `cargo run --release -- ARGS` runs the `automm` binary under test with ARGS,
//!   `cargo run --release --example edge -- ARGS` the example that `cargo test` built.
//! - The ports `127.0.0.1:50051` and `127.0.0.1:9090` become free ports, so the server binds no fixed port.
//! - A block after `<!-- readme-test: needs network -->` (the venv install from PyPI) runs only with
//!   `AUTOMM_README_NETWORK=1` (CI sets it); without it that block and those marked `needs venv` are
//!   reported as NOT RUN, and `needs onnxruntime` blocks run only when ONNX Runtime is installed
//!   anyway. `<!-- readme-test: not run: WHY -->` marks a block that is never run.
//!
//! The script runs with `set -eo pipefail` in its own process group, which the harness ends when it is
//! done, so the README's background server never outlives the test.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A fenced ```sh block, the marker comment right before it, and the ```text block that follows it
/// (its expected output), if any.
#[derive(Debug)]
struct Block {
    line: usize,
    marker: Option<String>,
    code: String,
    expected: Vec<String>,
}

/// The fenced block opened at `lines[open]`: its body and the index of its closing fence.
fn fenced(lines: &[&str], open: usize) -> (Vec<String>, usize) {
    let mut end = open + 1;
    while end < lines.len() && lines[end].trim_end() != "```" {
        end += 1;
    }
    (lines[open + 1..end.min(lines.len())].iter().map(|l| l.to_string()).collect(), end)
}

/// The ```sh blocks of `md`, each with the `<!-- readme-test: ... -->` comment on the line before its
/// fence, if any.
fn sh_blocks(md: &str) -> Vec<Block> {
    let lines: Vec<&str> = md.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() == "```sh" {
            let marker = i
                .checked_sub(1)
                .and_then(|j| lines[j].trim().strip_prefix("<!-- readme-test:"))
                .and_then(|m| m.strip_suffix("-->"))
                .map(|m| m.trim().to_string());
            let (code, end) = fenced(&lines, i);
            // The expected output: the next fenced block, when it is a ```text one.
            let next = (end + 1..lines.len()).find(|&j| lines[j].starts_with("```"));
            let expected = match next {
                Some(j) if lines[j].trim_end() == "```text" => fenced(&lines, j).0,
                _ => Vec::new(),
            };
            out.push(Block { line: i + 1, marker, code: code.join("\n"), expected });
            i = end;
        }
        i += 1;
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The script: a prelude that maps `cargo` onto what the test built, then the blocks to run, each
/// announced with its README line. Returns the script and the blocks left out, with why.
fn script(blocks: &[Block], network: bool, ort: bool, edge: &Path) -> (String, Vec<String>) {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_automm")).parent().unwrap().display().to_string();
    let mut s = format!(
        r#"set -eo pipefail
export PATH="{bin_dir}:$PATH"
cargo() {{
  case "$*" in
    "run --release -- "*) shift 3; automm "$@" ;;
    "run --release --example edge -- "*) shift 5; "{edge}" "$@" ;;
    "build --release"*|"install --path ."*|"test --release"*) echo "(readme test: 'cargo $*' skipped: the test runs inside that build)" ;;
    *) echo "readme test: the harness does not know 'cargo $*'" >&2; return 1 ;;
  esac
}}
"#,
        edge = edge.display()
    );
    let (grpc, metrics) = (free_port(), free_port());
    let mut skipped = Vec::new();
    for b in blocks {
        let why = match b.marker.as_deref() {
            Some(m) if m.starts_with("not run") => Some(m.to_string()),
            Some(m @ ("needs network" | "needs venv")) if !network => {
                Some(format!("{m} (set AUTOMM_README_NETWORK=1 to run it)"))
            }
            Some("needs onnxruntime") if !network && !ort => {
                Some("needs onnxruntime (neither the venv nor an installed ONNX Runtime)".to_string())
            }
            Some("needs network" | "needs venv" | "needs onnxruntime") | None => None,
            Some(other) => panic!("README.md line {}: unknown readme-test marker `{other}`", b.line),
        };
        if let Some(why) = why {
            skipped.push(format!("README.md line {}: {why}", b.line));
            continue;
        }
        let code = b
            .code
            .replace("127.0.0.1:50051", &format!("127.0.0.1:{grpc}"))
            .replace("127.0.0.1:9090", &format!("127.0.0.1:{metrics}"));
        s.push_str(&format!("echo '### README.md line {}'\n{code}\n", b.line));
    }
    s.push_str("echo '### README commands done'\n");
    (s, skipped)
}

/// Runs `script` with bash in `dir`, in its own process group, ended when it finishes or after `limit`.
fn run_script(dir: &Path, script: &str, limit: Duration) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let path = dir.join("readme.sh");
    std::fs::write(&path, script).unwrap();
    let log = dir.join("readme.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new("bash")
        .arg(&path)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .process_group(0)
        .spawn()
        .expect("bash");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t0.elapsed() > limit {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // The group is the bash we started and what it started (the README's server among them).
    let _ = Command::new("kill").args(["-TERM", "--", &format!("-{}", child.id())]).status();
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut text = String::new();
    std::fs::File::open(&log).unwrap().read_to_string(&mut text).unwrap();
    (status.is_some_and(|s| s.success()), text)
}

/// A scratch folder with the repository's shipped data and backbones linked in.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for name in ["data", "models"] {
        std::os::unix::fs::symlink(repo.join(name), dir.path().join(name)).unwrap();
    }
    let path = dir.path().to_path_buf();
    (dir, path)
}

/// Parts of an output line that differ from run to run or machine to machine.
const VOLATILE: &[&str] =
    &["127.0.0.1", "/path/to", "images/s", "done in", "version 1-", "ORT Build Info", "threads:", "per epoch", "e-"];

/// The README's expected outputs must still be what the commands print: every stable line of each
/// run block's ```text block appears in the log, but for a few (figures printed with more digits than a
/// CPU's floating-point order keeps may differ between hosts).
fn check_expected_output(blocks: &[Block], skipped: &[String], log: &str) {
    let printed: std::collections::HashSet<&str> = log.lines().map(str::trim_end).collect();
    let (mut checked, mut missing) = (0, Vec::new());
    for b in blocks.iter().filter(|b| !skipped.iter().any(|s| s.starts_with(&format!("README.md line {}:", b.line)))) {
        for l in b.expected.iter().map(|l| l.trim_end()).filter(|l| !l.is_empty()) {
            if VOLATILE.iter().any(|v| l.contains(v)) {
                continue;
            }
            checked += 1;
            if !printed.contains(l) {
                missing.push(format!("README.md block at line {}: `{l}`", b.line));
            }
        }
    }
    assert!(checked >= 40, "only {checked} expected-output lines checked");
    assert!(
        missing.len() * 20 <= checked,
        "{} of {checked} expected-output lines in README.md are no longer printed (update the README):\n{}",
        missing.len(),
        missing.join("\n")
    );
    for m in &missing {
        eprintln!("expected output not printed here: {m}");
    }
}

#[test]
fn readme_commands_run_as_written() {
    let md = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let blocks = sh_blocks(&md);
    assert!(blocks.len() >= 3, "README.md has {} sh blocks", blocks.len());
    let edge = Path::new(env!("CARGO_BIN_EXE_automm")).parent().unwrap().join("examples/edge");
    assert!(
        edge.is_file(),
        "{} is missing: the README runs the edge example, which `cargo test --release` builds \
         (`cargo test --release --test it` alone does not; run `cargo build --release --examples` first)",
        edge.display()
    );
    let network = std::env::var("AUTOMM_README_NETWORK").is_ok_and(|v| v == "1");
    let ort = network || crate::common::ort_available();
    let (script, skipped) = script(&blocks, network, ort, &edge);
    for s in &skipped {
        eprintln!("NOT RUN {s}");
    }
    let (_keep, dir) = scratch();
    let (ok, log) = run_script(&dir, &script, Duration::from_secs(900));
    let tail: String = log.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    assert!(ok && log.contains("### README commands done"), "README commands failed; the end of their output:\n{tail}");
    check_expected_output(&blocks, &skipped, &log);
    // The walkthrough's results are there, not just exit codes.
    for f in ["runs/demo/default.onnx", "runs/focal/config.json", "runs/focal.onnx", "runs/preds.csv"] {
        assert!(dir.join(f).is_file(), "{f} missing after the README's commands:\n{tail}");
    }
    eprintln!("{tail}");
}

#[test]
fn sh_blocks_keep_their_markers_and_lines() {
    let md = "x\n<!-- readme-test: needs network -->\n```sh\na\nb\n```\n\n```text\nout\n```\n```sh\nc\n```\n```rust\nd\n```\n";
    let b = sh_blocks(md);
    assert_eq!(b.len(), 2);
    assert_eq!((b[0].line, b[0].marker.as_deref(), b[0].code.as_str()), (3, Some("needs network"), "a\nb"));
    assert_eq!(b[0].expected, vec!["out".to_string()]);
    assert_eq!((b[1].line, b[1].marker.as_deref(), b[1].code.as_str()), (11, None, "c"));
    assert!(b[1].expected.is_empty());
    let (s, skipped) = script(&b, false, true, Path::new("/e"));
    assert!(!s.contains("\na\nb\n") && s.contains("\nc\n"), "{s}");
    assert_eq!(skipped.len(), 1);
}
