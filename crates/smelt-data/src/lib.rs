//! smelt's data layer: reading tabular text data (CSV, TSV, JSONL) in any encoding,
//! tokenization, batching, and the real assets used by tests and demos.

pub mod assets;
pub mod augment;
pub mod batch;
pub mod bpe_train;
pub mod error;
pub mod examples;
pub mod idx;
pub mod images;
pub mod lm_data;
pub mod lm_tokenizer;
pub mod table;
pub mod tokenize;

pub use error::{DataError, Result};
