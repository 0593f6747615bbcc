//! Training data of causal language models: prompt/completion pairs and chat conversations
//! (JSONL), tokenized with a mask that marks the completion tokens the loss counts; plain
//! text cut into fixed-length blocks for training from scratch; and the chatterbot YAML
//! corpus turned into conversations.

use crate::error::{DataError, Result};
use crate::lm_tokenizer::{validate_messages, LmTokenizer, Message};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One training example as written in the file.
#[derive(Clone, Debug, PartialEq)]
pub enum LmExample {
    /// A prompt and the completion the model should learn to produce after it.
    Pair { prompt: String, completion: String },
    /// A conversation; the loss counts the final assistant message.
    Chat { messages: Vec<Message> },
}

/// An example with its file position, for messages.
#[derive(Clone, Debug)]
pub struct LmRecord {
    pub line: usize,
    pub example: LmExample,
}

/// Reads JSONL where each line is `{"prompt": .., "completion": ..}` or
/// `{"messages": [{"role": .., "content": ..}, ..]}`. Blank lines are skipped; everything else
/// that does not fit is an error naming the line.
pub fn read_lm_jsonl(path: &Path) -> Result<Vec<LmRecord>> {
    let text = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let text = String::from_utf8(text).map_err(|e| {
        let upto = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = upto.iter().filter(|&&b| b == b'\n').count() + 1;
        DataError::Line {
            path: path.to_path_buf(),
            line,
            message: "not valid UTF-8 (JSON Lines files are UTF-8)".into(),
        }
    })?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        let bad = |message: String| DataError::Line {
            path: path.to_path_buf(),
            line,
            message,
        };
        let value: Value =
            serde_json::from_str(raw).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(bad("expected a JSON object".into()));
        };
        let example = if let Some(messages) = obj.get("messages") {
            let messages: Vec<Message> = serde_json::from_value(messages.clone()).map_err(|e| {
                bad(format!(
                    "`messages` must be a list of {{\"role\", \"content\"}} objects: {e}"
                ))
            })?;
            validate_messages(&messages, &format!("{} line {line}", path.display()))?;
            match messages.last() {
                Some(m) if m.role == "assistant" && !m.content.trim().is_empty() => {}
                Some(m) if m.role == "assistant" => {
                    return Err(bad("the final assistant message is empty".into()))
                }
                _ => {
                    return Err(bad(
                        "the conversation must end with an assistant message (the one the \
                         model learns)"
                            .into(),
                    ))
                }
            }
            LmExample::Chat { messages }
        } else {
            let field = |name: &str| -> Result<String> {
                match obj.get(name) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(other) => Err(bad(format!(
                        "field `{name}` must be a string, found {}",
                        kind(other)
                    ))),
                    None => Err(bad(format!(
                        "expected fields `prompt` and `completion` (or `messages`); `{name}` \
                         is missing"
                    ))),
                }
            };
            let prompt = field("prompt")?;
            let completion = field("completion")?;
            if completion.trim().is_empty() {
                return Err(bad("the completion is empty".into()));
            }
            LmExample::Pair { prompt, completion }
        };
        out.push(LmRecord { line, example });
    }
    if out.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A tokenized example: the loss counts predictions of `ids[i]` for `i >= target_from`.
#[derive(Clone, Debug, PartialEq)]
pub struct LmSequence {
    pub ids: Vec<u32>,
    pub target_from: usize,
}

impl LmSequence {
    /// Number of tokens the loss counts.
    pub fn targets(&self) -> usize {
        self.ids.len() - self.target_from
    }
}

/// Result of tokenizing a file.
pub struct Tokenized {
    pub sequences: Vec<LmSequence>,
    /// Examples whose completion was cut to fit `max_length`.
    pub truncated: usize,
}

/// Tokenizes examples: prompt (with BOS when the tokenizer adds one), then completion and
/// EOS; chats rendered with the tokenizer's chat template. A prompt that leaves no room for
/// a completion token within `max_length` is an error naming the line; a completion that
/// runs past it is cut (and counted). Every id must be below `vocab_size` (the model's).
pub fn tokenize_lm(
    records: &[LmRecord],
    tokenizer: &LmTokenizer,
    max_length: usize,
    vocab_size: usize,
    path: &Path,
) -> Result<Tokenized> {
    let mut sequences = Vec::with_capacity(records.len());
    let mut truncated = 0;
    for r in records {
        let bad = |message: String| DataError::Line {
            path: path.to_path_buf(),
            line: r.line,
            message,
        };
        let (prompt, completion) = match &r.example {
            LmExample::Pair { prompt, completion } => {
                let p = tokenizer
                    .encode(prompt, tokenizer.add_bos)
                    .map_err(|e| bad(e.to_string()))?;
                let mut c = tokenizer
                    .encode(completion, false)
                    .map_err(|e| bad(e.to_string()))?;
                if let Some(eos) = tokenizer.eos {
                    c.push(eos);
                }
                (p, c)
            }
            LmExample::Chat { messages } => {
                let head = &messages[..messages.len() - 1];
                let prompt_text = tokenizer
                    .render_chat(head, true)
                    .map_err(|e| bad(format!("chat template: {e}")))?;
                let full_text = tokenizer
                    .render_chat(messages, false)
                    .map_err(|e| bad(format!("chat template: {e}")))?;
                let Some(answer) = full_text.strip_prefix(&prompt_text) else {
                    return Err(bad(
                        "the chat template renders the conversation so that its prompt is not \
                         a prefix of it; cannot tell which tokens to learn"
                            .into(),
                    ));
                };
                let p = tokenizer
                    .encode(&prompt_text, false)
                    .map_err(|e| bad(e.to_string()))?;
                let c = tokenizer
                    .encode(answer, false)
                    .map_err(|e| bad(e.to_string()))?;
                (p, c)
            }
        };
        if prompt.len() + 1 > max_length {
            return Err(bad(format!(
                "the prompt is {} tokens long, which leaves no room for the completion within \
                 the maximum length of {max_length} tokens (the model's context, or \
                 --max-length)",
                prompt.len()
            )));
        }
        if completion.is_empty() {
            return Err(bad("the completion has no tokens".into()));
        }
        if let Some(&id) = prompt
            .iter()
            .chain(&completion)
            .find(|&&i| i as usize >= vocab_size)
        {
            return Err(bad(out_of_vocabulary(tokenizer, id, vocab_size)));
        }
        let mut ids = prompt;
        // The first target is the first completion token; a sequence needs one input before it.
        let target_from = ids.len().max(1);
        ids.extend(completion);
        if ids.len() > max_length {
            ids.truncate(max_length);
            truncated += 1;
        }
        if ids.len() <= target_from {
            return Err(bad(
                "no completion token fits within the maximum length".into()
            ));
        }
        sequences.push(LmSequence { ids, target_from });
    }
    Ok(Tokenized {
        sequences,
        truncated,
    })
}

fn out_of_vocabulary(tokenizer: &LmTokenizer, id: u32, vocab_size: usize) -> String {
    format!(
        "token id {id} (`{}`) is outside the model's vocabulary of {vocab_size} tokens (an \
         added token of the tokenizer that the model has no row for)",
        tokenizer.id_to_token(id).unwrap_or_default()
    )
}

/// Plain text files, tokenized and concatenated (an EOS between files when the tokenizer has
/// one) and cut into consecutive blocks of `block + 1` tokens overlapping by one: each block
/// gives `block` next-token predictions. The tail shorter than a block is dropped. Every id
/// must be below `vocab_size`.
pub fn text_blocks(
    files: &[PathBuf],
    tokenizer: &LmTokenizer,
    block: usize,
    vocab_size: usize,
) -> Result<(Vec<LmSequence>, usize)> {
    let mut ids = Vec::new();
    for path in files {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let upto = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            DataError::Line {
                path: path.clone(),
                line: upto.iter().filter(|&&b| b == b'\n').count() + 1,
                message: "not valid UTF-8".into(),
            }
        })?;
        if text.trim().is_empty() {
            return Err(DataError::Empty { path: path.clone() });
        }
        let encoded = tokenizer
            .encode(&text, false)
            .map_err(|e| DataError::Tokenizer {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if let Some(&bad) = encoded.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(DataError::Tokenizer {
                path: path.clone(),
                message: out_of_vocabulary(tokenizer, bad, vocab_size),
            });
        }
        ids.extend(encoded);
        if let Some(eos) = tokenizer.eos.filter(|&e| (e as usize) < vocab_size) {
            ids.push(eos);
        }
    }
    let total = ids.len();
    let mut out = Vec::new();
    let mut start = 0;
    while start + block < ids.len() {
        out.push(LmSequence {
            ids: ids[start..start + block + 1].to_vec(),
            target_from: 1,
        });
        start += block;
    }
    Ok((out, total))
}

/// Exchanges read from one chatterbot file.
pub struct ChatterbotFile {
    pub pairs: Vec<(String, String)>,
    /// 1-based numbers of conversations that are not lists of text turns (skipped).
    pub skipped: Vec<usize>,
}

/// Conversations of the chatterbot corpus (`categories`, `conversations`: lists of turns) as
/// user/assistant exchanges: each turn after the first answers the turn before it. An entry
/// that is not a list of turns is skipped and reported.
pub fn chatterbot_pairs(path: &Path) -> Result<ChatterbotFile> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).map_err(|e| DataError::Line {
            path: path.to_path_buf(),
            line: e.location().map_or(0, |l| l.line()),
            message: format!("not valid YAML: {e}"),
        })?;
    let conversations = doc
        .get("conversations")
        .and_then(|c| c.as_sequence())
        .ok_or_else(|| {
            DataError::Invalid(format!(
                "{}: expected a `conversations` list",
                path.display()
            ))
        })?;
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for (i, conv) in conversations.iter().enumerate() {
        let Some(turns) = conv.as_sequence() else {
            skipped.push(i + 1);
            continue;
        };
        let texts: Option<Vec<String>> = turns
            .iter()
            .map(|t| match t {
                serde_yaml_ng::Value::String(s) => Some(s.trim().to_string()),
                serde_yaml_ng::Value::Number(n) => Some(n.to_string()),
                serde_yaml_ng::Value::Bool(b) => Some(b.to_string()),
                _ => None,
            })
            .collect();
        // A turn that is a list or a mapping is not text: the conversation is reported.
        let Some(texts) = texts else {
            skipped.push(i + 1);
            continue;
        };
        for w in texts.windows(2) {
            if !w[0].is_empty() && !w[1].is_empty() {
                out.push((w[0].clone(), w[1].clone()));
            }
        }
    }
    Ok(ChatterbotFile {
        pairs: out,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .suffix(".jsonl")
            .tempfile()
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn reads_pairs_and_chats() {
        let f = file(
            "{\"prompt\": \"Q: 1+1?\", \"completion\": \" 2\"}\n\n\
             {\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, \
             {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
        );
        let r = read_lm_jsonl(f.path()).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].line, 3);
        assert!(matches!(r[1].example, LmExample::Chat { .. }));
    }

    #[test]
    fn bad_lines_are_named() {
        let cases = [
            (
                "{\"prompt\": \"x\", \"completion\": \"  \"}\n",
                "line 1: the completion is empty",
            ),
            ("{\"prompt\": \"x\"}\n", "`completion` is missing"),
            ("\n{not json\n", "line 2: not valid JSON"),
            (
                "{\"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}]}\n",
                "role `wizard`",
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
                "must end with an assistant message",
            ),
            (
                "{\"prompt\": 3, \"completion\": \"y\"}\n",
                "must be a string, found a number",
            ),
        ];
        for (text, expect) in cases {
            let f = file(text);
            let e = read_lm_jsonl(f.path()).unwrap_err().to_string();
            assert!(e.contains(expect), "{text:?}: {e}");
        }
        let f = file("\n\n");
        assert!(matches!(
            read_lm_jsonl(f.path()),
            Err(DataError::Empty { .. })
        ));
    }

    #[test]
    fn tokens_beyond_the_models_vocabulary_are_named() {
        let tok = crate::assets::locate("models/gpt2-tokenizer").expect("gpt2 tokenizer asset");
        let tokenizer = LmTokenizer::from_hf(&tok.join("tokenizer.json")).unwrap();
        let f = file("{\"prompt\": \"a\", \"completion\": \"b <|startoftranscript|>\"}\n");
        let records = read_lm_jsonl(f.path()).unwrap();
        let e = tokenize_lm(&records, &tokenizer, 64, 50257, f.path())
            .err()
            .expect("an id beyond the vocabulary")
            .to_string();
        assert!(
            e.contains("line 1: token id 50257 (`<|startoftranscript|>`) is outside the model's vocabulary of 50257"),
            "{e}"
        );
        let ok = tokenize_lm(&records, &tokenizer, 64, 60000, f.path()).unwrap();
        assert_eq!(ok.sequences.len(), 1);
        let seq = &ok.sequences[0];
        assert_eq!(
            seq.ids[..seq.target_from],
            tokenizer.encode("a", false).unwrap()[..]
        );
        assert_eq!(seq.ids.last().copied(), tokenizer.eos);
    }

    #[test]
    fn chatterbot_conversations_become_exchanges() {
        let mut f = tempfile::Builder::new().suffix(".yml").tempfile().unwrap();
        f.write_all(
            b"categories:\n- x\nconversations:\n- - Hello\n  - Hi there\n  - How are you?\n\
              - not a list - 'oops'\n- - |\n    multi\n    line\n  - 42\n- - a: b\n  - c\n",
        )
        .unwrap();
        let r = chatterbot_pairs(f.path()).unwrap();
        assert_eq!(
            r.pairs,
            vec![
                ("Hello".to_string(), "Hi there".to_string()),
                ("Hi there".to_string(), "How are you?".to_string()),
                ("multi\nline".to_string(), "42".to_string()),
            ]
        );
        assert_eq!(r.skipped, vec![2, 4]);
        let f = file("\n\n");
        assert!(matches!(
            read_lm_jsonl(f.path()),
            Err(DataError::Empty { .. })
        ));
    }
}
