//! Build script. Our own protos are compiled through protox (pure Rust); nothing to do yet beyond making
//! sure cargo re-runs when they change.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
