//! Data in: tables of image paths and labels (polars, CSV/Parquet), the class list, the stratified
//! holdout split, and image decoding/preprocessing into backbone input tensors.

pub mod augment;
pub mod image;
pub mod table;

pub use self::image::{ImageRef, Normalization, Preprocess};
pub use self::table::{holdout_fraction, stratified_split, ClassList, Table};
