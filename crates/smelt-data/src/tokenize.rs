//! Tokenizers for the encoders: a `tokenizer.json`, or a WordPiece vocabulary (`vocab.txt`).

use crate::error::{DataError, Result};
use std::path::{Path, PathBuf};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{
    PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

/// A text tokenizer producing model inputs.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The file it was loaded from, for messages and for copying next to a saved model.
    pub source: PathBuf,
    pub pad_id: u32,
}

/// One tokenized input: ids and token types, without padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl TextTokenizer {
    /// Loads the tokenizer of a model directory: `tokenizer.json` when present, otherwise a
    /// BERT WordPiece tokenizer built from `vocab.txt` (lower-casing unless
    /// `tokenizer_config.json` says `"do_lower_case": false`).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_json(&json);
        }
        let vocab = dir.join("vocab.txt");
        if vocab.is_file() {
            return Self::from_vocab(&vocab, lower_case(dir));
        }
        Err(DataError::Tokenizer {
            path: dir.to_path_buf(),
            message: "no tokenizer.json or vocab.txt in the model directory".into(),
        })
    }

    /// Loads a `tokenizer.json`, removing any padding or truncation it enables: smelt pads
    /// per batch and truncates to the length the user asks for.
    pub fn from_json(path: &Path) -> Result<Self> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| DataError::Tokenizer {
            path: path.to_path_buf(),
            message: format!("cannot load tokenizer: {e}"),
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| DataError::Tokenizer {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let pad_id = inner
            .token_to_id("[PAD]")
            .or_else(|| inner.token_to_id("<pad>"))
            .unwrap_or(0);
        Ok(Self {
            inner,
            source: path.to_path_buf(),
            pad_id,
        })
    }

    /// Builds a BERT WordPiece tokenizer from a `vocab.txt`.
    pub fn from_vocab(path: &Path, lowercase: bool) -> Result<Self> {
        let err = |message: String| DataError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        let vocab = path
            .to_str()
            .ok_or_else(|| err("the path is not valid UTF-8".into()))?;
        let model = WordPiece::from_file(vocab)
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| err(format!("cannot read the vocabulary: {e}")))?;
        let mut inner = Tokenizer::new(model);
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| err(format!("the vocabulary has no `{token}` token")))
        };
        let (cls, sep, pad) = (id("[CLS]")?, id("[SEP]")?, id("[PAD]")?);
        inner.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)));
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        inner.with_post_processor(Some(BertProcessing::new(
            ("[SEP]".into(), sep),
            ("[CLS]".into(), cls),
        )));
        Ok(Self {
            inner,
            source: path.to_path_buf(),
            pad_id: pad,
        })
    }

    /// Tokenizes one text or a text pair with special tokens, truncating the longest side
    /// first so that the result has at most `max_length` tokens.
    pub fn encode(&self, text: &str, pair: Option<&str>, max_length: usize) -> Result<Encoded> {
        let mut all = self.encode_all([(text, pair)], max_length)?;
        all.pop()
            .ok_or_else(|| self.error("the tokenizer returned nothing".into()))
    }

    /// Tokenizes many inputs with one truncation setting.
    pub fn encode_all<'a>(
        &self,
        inputs: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
        max_length: usize,
    ) -> Result<Vec<Encoded>> {
        let special = |is_pair: bool| {
            self.inner
                .get_post_processor()
                .map_or(0, |p| p.added_tokens(is_pair))
        };
        let check = |is_pair: bool| {
            let added = special(is_pair);
            if max_length <= added {
                return Err(self.error(format!(
                    "--max-length {max_length} leaves no room for text: {added} special \
                     tokens are added{}",
                    if is_pair { " to a sentence pair" } else { "" }
                )));
            }
            Ok(())
        };
        check(false)?;
        let mut tokenizer = self.inner.clone();
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| self.error(e.to_string()))?;
        inputs
            .into_iter()
            .map(|(text, pair)| {
                if pair.is_some() {
                    check(true)?;
                }
                let encoding = match pair {
                    None => tokenizer.encode(text, true),
                    Some(p) => tokenizer.encode((text, p), true),
                }
                .map_err(|e| self.error(format!("cannot tokenize: {e}")))?;
                Ok(Encoded {
                    ids: encoding.get_ids().to_vec(),
                    type_ids: encoding.get_type_ids().to_vec(),
                })
            })
            .collect()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn error(&self, message: String) -> DataError {
        DataError::Tokenizer {
            path: self.source.clone(),
            message,
        }
    }
}

fn lower_case(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("do_lower_case").and_then(|b| b.as_bool()))
        .unwrap_or(true)
}
