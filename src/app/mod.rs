//! Whole-product programs built from every stage: the offline demo ([`demo`]), generated image data
//! ([`synth`]) and the benchmarks behind `automm bench` ([`mod@bench`]).

pub mod bench;
pub mod demo;
pub mod synth;
