//! Data in, the first stage: tables of image paths and labels (polars, CSV/Parquet), the class list, the
//! stratified holdout split ([`table`]), image references, decoding and preprocessing into backbone input
//! tensors ([`image`]) and seeded training-time augmentation ([`augment`]).

pub mod augment;
pub mod image;
pub mod table;

pub use self::image::{ImageRef, Normalization, Preprocess};
pub use self::table::{holdout_fraction, stratified_split, ClassList, Table};
