//! Helpers shared by the integration tests.

use std::path::PathBuf;
use std::process::Command;

/// The `automm` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_automm"))
}

/// A committed fixture under models/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/fixtures").join(name)
}

/// True when ONNX Runtime can be found. CI sets AUTOMM_REQUIRE_ORT=1, and there a missing library fails
/// the test instead; elsewhere the caller's ORT part is reported as not run.
pub fn ort_available() -> bool {
    match automm::deploy::engine::ort::locate() {
        Ok(_) => true,
        Err(e) => {
            assert!(std::env::var("AUTOMM_REQUIRE_ORT").is_err(), "AUTOMM_REQUIRE_ORT is set but: {e}");
            eprintln!("NOT RUN (ONNX Runtime part): {e}");
            false
        }
    }
}

/// A library training request on the committed CNN fixture backbone (label column `label`, ImageNet
/// normalisation, quiet).
pub fn train_request(
    train_data: PathBuf,
    output: PathBuf,
    hp: automm::model::hparams::HyperParams,
) -> automm::train::TrainRequest {
    automm::train::TrainRequest {
        train_data,
        label: "label".into(),
        image_column: None,
        tuning_data: None,
        backbone: fixture("cnn_fixture.onnx"),
        feature_tensor: None,
        normalization: Some(automm::data::Normalization::imagenet()),
        output,
        hp,
        quiet: true,
        cancel: None,
        force: false,
    }
}
