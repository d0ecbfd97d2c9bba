//! Table reader: CSV bytes (or Parquet, when the input starts with the Parquet magic) -> polars ->
//! image/label columns -> rows, then the class list and targets training uses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
