//! Text-classification examples taken from a [`Table`]: one or two text columns and a label.

use crate::error::{DataError, Result};
use crate::table::{ReadOptions, Table};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Which columns hold what.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Columns {
    pub text: String,
    /// Second text of a sentence pair.
    pub text_pair: Option<String>,
    /// The label column; `None` when only predicting.
    pub label: Option<String>,
}

/// One example as read from the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TextExample {
    pub line: usize,
    pub text: String,
    pub text_pair: Option<String>,
    pub label: Option<String>,
}

/// Examples of one file, and how many rows were skipped for an empty text.
#[derive(Debug, Clone)]
pub struct ExampleSet {
    pub path: PathBuf,
    pub examples: Vec<TextExample>,
    pub skipped_empty: usize,
}

/// Reads examples. A row whose text is empty is skipped and counted, or is an error when
/// `strict`; a row without a label (when a label column is named) is an error.
pub fn read_examples(
    path: &Path,
    columns: &Columns,
    options: &ReadOptions,
    strict: bool,
) -> Result<ExampleSet> {
    let table = Table::read(path, options)?;
    let text_col = table.column(&columns.text)?;
    let pair_col = columns
        .text_pair
        .as_deref()
        .map(|c| table.column(c))
        .transpose()?;
    let label_col = columns
        .label
        .as_deref()
        .map(|c| table.column(c))
        .transpose()?;

    let mut examples = Vec::with_capacity(table.rows.len());
    let mut skipped_empty = 0;
    for row in &table.rows {
        let get = |i: usize| row.values.get(i).cloned().flatten();
        let text = get(text_col).unwrap_or_default();
        let text_pair = pair_col.map(|i| get(i).unwrap_or_default());
        let empty =
            text.trim().is_empty() || text_pair.as_ref().is_some_and(|t| t.trim().is_empty());
        if empty {
            if strict {
                return Err(DataError::Line {
                    path: path.to_path_buf(),
                    line: row.line,
                    message: "empty text (rows with empty text are skipped without --strict)"
                        .into(),
                });
            }
            skipped_empty += 1;
            continue;
        }
        let label = match label_col {
            None => None,
            Some(i) => match get(i).map(|l| l.trim().to_string()) {
                Some(l) if !l.is_empty() => Some(l),
                _ => {
                    return Err(DataError::Line {
                        path: path.to_path_buf(),
                        line: row.line,
                        message: format!(
                            "column `{}` is empty: every row needs a label",
                            columns.label.as_deref().unwrap_or_default()
                        ),
                    })
                }
            },
        };
        examples.push(TextExample {
            line: row.line,
            text,
            text_pair,
            label,
        });
    }
    if examples.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    if skipped_empty > 0 {
        tracing::warn!(
            "{}: skipped {skipped_empty} rows with empty text",
            path.display()
        );
    }
    Ok(ExampleSet {
        path: path.to_path_buf(),
        examples,
        skipped_empty,
    })
}

/// The class names of a training set, in a stable order: numeric order when every label
/// is an integer, otherwise lexicographic.
pub fn label_set(examples: &[TextExample]) -> Vec<String> {
    let unique: BTreeSet<&str> = examples.iter().filter_map(|e| e.label.as_deref()).collect();
    let mut labels: Vec<String> = unique.into_iter().map(str::to_string).collect();
    if labels.iter().all(|l| l.parse::<i64>().is_ok()) {
        labels.sort_by_key(|l| l.parse::<i64>().unwrap_or(0));
    }
    labels
}

/// Maps each example's label to its class index, failing on a label not in `labels`.
pub fn label_indices(set: &ExampleSet, labels: &[String]) -> Result<Vec<i64>> {
    set.examples
        .iter()
        .map(|e| {
            let label = e.label.as_deref().unwrap_or_default();
            labels
                .iter()
                .position(|l| l == label)
                .map(|i| i as i64)
                .ok_or_else(|| DataError::Line {
                    path: set.path.clone(),
                    line: e.line,
                    message: format!(
                        "unknown label `{label}`: the model's labels are {}",
                        labels
                            .iter()
                            .map(|l| format!("`{l}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })
        })
        .collect()
}
