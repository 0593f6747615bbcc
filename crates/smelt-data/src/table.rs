//! Tabular files (CSV, TSV, JSON lines) decoded from any encoding into rows of strings.

use crate::error::{DataError, Result};
use encoding_rs::Encoding;
use std::path::{Path, PathBuf};

/// File layout of a data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Tsv,
    Jsonl,
}

impl Format {
    /// Guesses the format from the file extension.
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        match ext.as_str() {
            "csv" => Ok(Format::Csv),
            "tsv" | "tab" => Ok(Format::Tsv),
            "jsonl" | "ndjson" | "json" => Ok(Format::Jsonl),
            _ => Err(DataError::UnknownFormat {
                path: path.to_path_buf(),
            }),
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "csv" => Ok(Format::Csv),
            "tsv" => Ok(Format::Tsv),
            "jsonl" | "ndjson" => Ok(Format::Jsonl),
            other => Err(DataError::Invalid(format!(
                "unknown format `{other}`: expected csv, tsv or jsonl"
            ))),
        }
    }
}

/// How to read a data file.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ReadOptions {
    /// Forced format; guessed from the extension when `None`.
    pub format: Option<Format>,
    /// A WHATWG encoding label; UTF-8 (strict) when `None`.
    pub encoding: Option<String>,
    /// CSV/TSV without a header row: columns are then named `1`, `2`, ... (1-based).
    pub no_header: bool,
}

/// One data row with the line of the file it started on (1-based).
#[derive(Debug, Clone)]
pub struct Row {
    pub line: usize,
    pub values: Vec<Option<String>>,
}

/// A decoded table: column names and rows.
#[derive(Debug, Clone)]
pub struct Table {
    pub path: PathBuf,
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
}

impl Table {
    /// Reads and decodes `path`. Invalid bytes for the encoding are an error naming the line.
    pub fn read(path: &Path, options: &ReadOptions) -> Result<Self> {
        let format = match options.format {
            Some(f) => f,
            None => Format::from_path(path)?,
        };
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        let text = decode(path, &bytes, options.encoding.as_deref())?;
        let table = match format {
            Format::Csv => read_delimited(path, &text, b',', true, options.no_header)?,
            Format::Tsv => read_delimited(path, &text, b'\t', false, options.no_header)?,
            Format::Jsonl => read_jsonl(path, &text)?,
        };
        if table.rows.is_empty() {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(table)
    }

    /// Index of column `name`, or an error listing the columns there are.
    pub fn column(&self, name: &str) -> Result<usize> {
        self.columns
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| DataError::MissingColumn {
                path: self.path.clone(),
                column: name.to_string(),
                available: self
                    .columns
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// Decodes `bytes` with the named encoding (strict UTF-8 by default), dropping a BOM.
pub fn decode(path: &Path, bytes: &[u8], encoding: Option<&str>) -> Result<String> {
    let encoding = match encoding {
        None => encoding_rs::UTF_8,
        Some(label) => Encoding::for_label(label.trim().as_bytes())
            .ok_or_else(|| DataError::UnknownEncoding(label.to_string()))?,
    };
    let (text, had_errors) = encoding.decode_with_bom_removal(bytes);
    if had_errors {
        // Locate the first byte the decoder could not map, for the message.
        let bad = first_invalid(bytes, encoding);
        let line = bytes[..bad].iter().filter(|b| **b == b'\n').count() + 1;
        let line_start = bytes[..bad]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |p| p + 1);
        return Err(DataError::Encoding {
            path: path.to_path_buf(),
            line,
            column: bad - line_start + 1,
            byte: bytes[bad],
            encoding: encoding.name().to_string(),
        });
    }
    Ok(text.into_owned())
}

fn first_invalid(bytes: &[u8], encoding: &'static Encoding) -> usize {
    if encoding == encoding_rs::UTF_8 {
        return std::str::from_utf8(bytes).map_or_else(|e| e.valid_up_to(), |_| 0);
    }
    // Other (ASCII-compatible) encodings: the first line that does not decode.
    let mut start = 0;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        if encoding
            .decode_without_bom_handling_and_without_replacement(line)
            .is_none()
        {
            return start;
        }
        start += line.len();
    }
    0
}

fn read_delimited(
    path: &Path,
    text: &str,
    delimiter: u8,
    quoting: bool,
    no_header: bool,
) -> Result<Table> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(quoting)
        .has_headers(!no_header)
        .flexible(true)
        .from_reader(text.as_bytes());
    let csv_err = |e: csv::Error| {
        let line = e.position().map_or(0, |p| p.line() as usize);
        DataError::Line {
            path: path.to_path_buf(),
            line,
            message: e.to_string(),
        }
    };
    let mut columns: Vec<String> = if no_header {
        Vec::new()
    } else {
        reader
            .headers()
            .map_err(csv_err)?
            .iter()
            .map(|h| h.trim().to_string())
            .collect()
    };
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_err)?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        if record.len() == 1 && record.get(0).is_some_and(|f| f.trim().is_empty()) {
            continue; // blank line
        }
        if no_header && record.len() > columns.len() {
            columns = (1..=record.len()).map(|i| i.to_string()).collect();
        }
        if !no_header && record.len() != columns.len() {
            return Err(DataError::Line {
                path: path.to_path_buf(),
                line,
                message: format!(
                    "expected {} fields as in the header, found {}",
                    columns.len(),
                    record.len()
                ),
            });
        }
        let values = record
            .iter()
            .map(|f| Some(f.trim_end_matches('\r').to_string()))
            .collect();
        rows.push(Row { line, values });
    }
    Ok(Table {
        path: path.to_path_buf(),
        columns,
        rows,
    })
}

fn read_jsonl(path: &Path, text: &str) -> Result<Table> {
    let mut columns: Vec<String> = Vec::new();
    let mut objects = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(raw).map_err(|e| DataError::Line {
            path: path.to_path_buf(),
            line,
            message: format!("not valid JSON: {e}"),
        })?;
        let serde_json::Value::Object(map) = value else {
            return Err(DataError::Line {
                path: path.to_path_buf(),
                line,
                message: "expected a JSON object".into(),
            });
        };
        for key in map.keys() {
            if !columns.contains(key) {
                columns.push(key.clone());
            }
        }
        objects.push((line, map));
    }
    let rows = objects
        .into_iter()
        .map(|(line, map)| Row {
            line,
            values: columns
                .iter()
                .map(|c| match map.get(c) {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(other) => Some(other.to_string()),
                })
                .collect(),
        })
        .collect();
    Ok(Table {
        path: path.to_path_buf(),
        columns,
        rows,
    })
}
