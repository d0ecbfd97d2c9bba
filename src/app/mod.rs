//! Whole-product programs built from every stage: the offline demo ([`demo`]), generated image data
//! ([`synth`]) and the benchmarks behind `automm bench` ([`mod@bench`], [`finetune_bench`]).

pub mod bench;
pub mod demo;
pub mod finetune_bench;
pub mod synth;
