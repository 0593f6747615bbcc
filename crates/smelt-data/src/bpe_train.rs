//! Training a byte-level BPE tokenizer (GPT-2's scheme) on text files.

use crate::error::{DataError, Result};
use std::path::PathBuf;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// The end-of-text token every trained vocabulary holds (placed first, at id 0).
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// Options of a training run.
#[derive(Clone, Debug)]
pub struct BpeOptions {
    pub vocab_size: usize,
    /// Pairs seen fewer times are not merged.
    pub min_frequency: u64,
}

/// Trains on `inputs` and returns the tokenizer (not yet written).
pub fn train_bpe(inputs: &[PathBuf], options: &BpeOptions) -> Result<Tokenizer> {
    let alphabet = ByteLevel::alphabet();
    if options.vocab_size < alphabet.len() + 1 {
        return Err(DataError::Invalid(format!(
            "--vocab-size {} is too small: a byte-level vocabulary starts with {} byte tokens \
             and {END_OF_TEXT}",
            options.vocab_size,
            alphabet.len()
        )));
    }
    if inputs.is_empty() {
        return Err(DataError::Invalid("no input files to train on".into()));
    }
    for p in inputs {
        let meta = std::fs::metadata(p).map_err(|e| DataError::io(p, e))?;
        if meta.len() == 0 {
            return Err(DataError::Empty { path: p.clone() });
        }
        // The trainer reads the files itself and reports bad bytes without the file's name.
        let bytes = std::fs::read(p).map_err(|e| DataError::io(p, e))?;
        if let Err(e) = std::str::from_utf8(&bytes) {
            let upto = &bytes[..e.valid_up_to()];
            return Err(DataError::Line {
                path: p.clone(),
                line: upto.iter().filter(|&&b| b == b'\n').count() + 1,
                message: "not valid UTF-8".into(),
            });
        }
    }
    let trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(options.vocab_size)
        .min_frequency(options.min_frequency)
        .initial_alphabet(alphabet.into_iter().collect())
        .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
        .build();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let files: Vec<String> = inputs
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    tokenizer
        .train_from_files(&mut trainer, files)
        .map_err(|e| DataError::Invalid(format!("tokenizer training failed: {e}")))?;
    Ok(tokenizer)
}

/// The tokenizer as `tokenizer.json` text (pretty-printed).
pub fn tokenizer_json(tokenizer: &Tokenizer) -> Result<String> {
    tokenizer
        .to_string(true)
        .map_err(|e| DataError::Invalid(format!("cannot serialise the tokenizer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm_tokenizer::LmTokenizer;

    #[test]
    fn trains_a_byte_level_vocabulary_that_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("a.txt");
        std::fs::write(
            &text,
            "It is a truth universally acknowledged, that a single man in possession of a good \
             fortune, must be in want of a wife.\n"
                .repeat(20),
        )
        .unwrap();
        let options = BpeOptions {
            vocab_size: 300,
            min_frequency: 2,
        };
        let tok = train_bpe(&[text.clone()], &options).unwrap();
        assert!(tok.get_vocab_size(true) <= 300);
        assert!(tok.get_vocab_size(true) > 257, "merges were learnt");
        let out = dir.path().join("tokenizer.json");
        std::fs::write(&out, tokenizer_json(&tok).unwrap()).unwrap();
        let lm = LmTokenizer::from_hf(&out).unwrap();
        assert_eq!(lm.eos, lm.token_to_id(END_OF_TEXT));
        let s = "a single man — ünïcödé";
        let ids = lm.encode(s, false).unwrap();
        assert_eq!(lm.decode(&ids, false).unwrap(), s);
        let short = lm.encode("a single man", false).unwrap();
        assert!(short.len() < "a single man".len(), "merged: {short:?}");

        let e = train_bpe(
            &[text],
            &BpeOptions {
                vocab_size: 10,
                min_frequency: 2,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
    }
}
