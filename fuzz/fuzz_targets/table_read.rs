//! Table reader: CSV bytes (or Parquet, when the input starts with the Parquet magic) -> polars ->
//! image/label columns -> rows, then the class list and targets training uses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: {
    // A panic inside polars' own code is a polars bug that `read_frame` catches and reports as an error
    // (see tests/hostile.rs, fuzz_crashes_stay_fixed); the fuzzer keeps looking for everything else.
    let abort_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.location().is_some_and(|l| l.file().contains("/polars-")) {
            return;
        }
        abort_hook(info);
    }));
}, |data: &[u8]| {
    thread_local! {
        static DIR: tempfile::TempDir = tempfile::tempdir().expect("temp dir");
    }
    DIR.with(|d| {
        let name = if data.starts_with(b"PAR1") { "t.parquet" } else { "t.csv" };
        let p = d.path().join(name);
        if std::fs::write(&p, data).is_err() {
            return;
        }
        for label in [Some("label"), None] {
            if let Ok(t) = automm::data::Table::load(&p, label, None) {
                if let Ok(classes) = automm::data::ClassList::from_table(&t) {
                    let _ = t.targets(&classes);
                }
            }
        }
    });
});
