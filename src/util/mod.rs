//! Plumbing every stage uses and none owns: atomic files and sha256 ([`fs`]), progress bars
//! ([`progress`]), the compute device ([`device`]) and enums with their names written once ([`names`]).

pub mod device;
pub mod fs;
pub mod names;
pub mod progress;
