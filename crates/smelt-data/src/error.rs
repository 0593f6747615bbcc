//! Errors of the data layer. Each names the file and, where there is one, the line.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, DataError>;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        // Not marked as the error's source: the message already includes it, and `{:#}`
        // would print it twice.
        source: std::io::Error,
    },
    #[error(
        "{path}: line {line} is not valid {encoding} (byte 0x{byte:02x} at column {column}); \
         pass `--encoding` with the file's encoding, for example `--encoding windows-1252`"
    )]
    Encoding {
        path: PathBuf,
        line: usize,
        column: usize,
        byte: u8,
        encoding: String,
    },
    #[error("unknown encoding `{0}`: expected a WHATWG label such as utf-8, windows-1252, latin1, utf-16le")]
    UnknownEncoding(String),
    #[error("{path}: the file has no data rows")]
    Empty { path: PathBuf },
    #[error("{path}: no column `{column}`; the columns are: {available}")]
    MissingColumn {
        path: PathBuf,
        column: String,
        available: String,
    },
    #[error("{path}: line {line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: cannot tell the format from the extension; pass `--format csv|tsv|jsonl`")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
