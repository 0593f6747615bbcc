//! Tokenizers of causal language models: byte-level BPE built from a GGUF vocabulary, or a
//! Hugging Face `tokenizer.json`; plus chat templates rendered with a Jinja engine.

use crate::error::{DataError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// The roles chat templates know.
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// The tokenizer of a causal LM with its special tokens and chat template.
pub struct LmTokenizer {
    inner: Tokenizer,
    /// Where it came from, for messages.
    pub source: PathBuf,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Whether prompts start with the BOS token.
    pub add_bos: bool,
    /// Tokens that end a generated turn (EOS and end-of-turn markers).
    pub stop_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

/// The vocabulary part of GGUF tokenizer metadata (`tokenizer.ggml.*`).
pub struct GgufVocab<'a> {
    pub model: &'a str,
    pub pre: Option<&'a str>,
    pub tokens: Vec<String>,
    pub token_types: Option<Vec<i64>>,
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

/// End-of-turn tokens of common chat formats; those present in a vocabulary stop generation.
const END_OF_TURN: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
];

impl LmTokenizer {
    /// Builds the byte-level BPE tokenizer described by GGUF metadata (`tokenizer.ggml.model`
    /// = `gpt2`). Control and user-defined tokens become added tokens, matched whole in text.
    pub fn from_gguf(path: &Path, vocab: GgufVocab<'_>) -> Result<Self> {
        let err = |message: String| DataError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        if vocab.model != "gpt2" {
            return Err(err(format!(
                "tokenizer.ggml.model is `{}`; smelt builds byte-level BPE (`gpt2`) tokenizers \
                 from GGUF metadata (SentencePiece vocabularies are not supported)",
                vocab.model
            )));
        }
        let n = vocab.tokens.len();
        if n == 0 {
            return Err(err("tokenizer.ggml.tokens is empty".into()));
        }
        if let Some(types) = &vocab.token_types {
            if types.len() != n {
                return Err(err(format!(
                    "tokenizer.ggml.token_type has {} entries for {n} tokens",
                    types.len()
                )));
            }
        }
        for (key, id) in [("bos", vocab.bos), ("eos", vocab.eos)] {
            if let Some(id) = id.filter(|&i| i as usize >= n) {
                return Err(err(format!(
                    "tokenizer.ggml.{key}_token_id is {id}, outside the {n} tokens"
                )));
            }
        }
        let mut map = serde_json::Map::with_capacity(n);
        let mut added = Vec::new();
        for (id, tok) in vocab.tokens.iter().enumerate() {
            if let Some(first) = map.insert(tok.clone(), json!(id)) {
                return Err(err(format!(
                    "tokenizer.ggml.tokens has {tok:?} twice (ids {first} and {id})"
                )));
            }
            // GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
            let ty = vocab.token_types.as_ref().map(|t| t[id]).unwrap_or(1);
            if ty == 3 || ty == 4 {
                added.push(json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == 3,
                }));
            }
        }
        for (i, m) in vocab.merges.iter().enumerate() {
            if m.split(' ').count() != 2 {
                return Err(err(format!(
                    "tokenizer.ggml.merges entry {i} is {m:?}, expected two tokens separated by a space"
                )));
            }
        }
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                                "trim_offsets": true, "use_regex": true});
        let pre_tokenizer = match vocab.pre.unwrap_or("default") {
            // Digits one at a time, then GPT-2's split (as llama.cpp and the original tokenizers).
            "smollm" | "starcoder" | "refact" | "codeshell" => json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
            }),
            "gpt2" | "default" | "gpt-2" | "phi-2" => byte_level,
            "llama-bpe" | "llama3" | "smaug-bpe" => json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated",
                     "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                     "use_regex": false},
                ],
            }),
            other => {
                tracing::warn!(
                    "{}: unknown tokenizer.ggml.pre `{other}`; using GPT-2's pre-tokenizer",
                    path.display()
                );
                byte_level
            }
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": map, "merges": vocab.merges},
        });
        let inner: Tokenizer = serde_json::to_string(&spec)
            .map_err(|e| err(e.to_string()))?
            .parse()
            .map_err(|e| {
                err(format!(
                    "cannot build the tokenizer from GGUF metadata: {e}"
                ))
            })?;
        Ok(Self::finish(
            inner,
            path,
            vocab.bos,
            vocab.eos,
            vocab.add_bos,
            vocab.chat_template,
        ))
    }

    /// Loads `tokenizer.json` of a model directory (or the file itself), with special tokens
    /// and the chat template from `tokenizer_config.json` next to it.
    pub fn from_hf(path: &Path) -> Result<Self> {
        let (file, dir) = if path.is_dir() {
            (path.join("tokenizer.json"), path.to_path_buf())
        } else {
            (
                path.to_path_buf(),
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            )
        };
        let err = |message: String| DataError::Tokenizer {
            path: file.clone(),
            message,
        };
        if !file.is_file() {
            return Err(err(
                "no tokenizer.json (a byte-level BPE tokenizer is needed)".into(),
            ));
        }
        let mut inner =
            Tokenizer::from_file(&file).map_err(|e| err(format!("cannot load: {e}")))?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| err(e.to_string()))?;
        let config: Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| DataError::Tokenizer {
                path: dir.join("tokenizer_config.json"),
                message: format!("not valid JSON: {e}"),
            })?,
            Err(_) => Value::Null,
        };
        let token = |key: &str| -> Option<u32> {
            let v = config.get(key)?;
            let text = v
                .as_str()
                .or_else(|| v.get("content").and_then(Value::as_str))?;
            inner.token_to_id(text)
        };
        let eos = token("eos_token").or_else(|| inner.token_to_id("<|endoftext|>"));
        let bos = token("bos_token");
        // BOS is added either by `add_bos_token` in the config or by the tokenizer's own
        // post-processor (as Llama 3's `TemplateProcessing` does).
        let adds_bos_itself = match (bos, inner.encode("a", true), inner.encode("a", false)) {
            (Some(b), Ok(with), Ok(without)) => {
                with.get_ids().first() == Some(&b) && without.get_ids().first() != Some(&b)
            }
            _ => false,
        };
        let add_bos = config
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(adds_bos_itself);
        let chat_template = config
            .get("chat_template")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Self::finish(
            inner,
            &file,
            bos,
            eos,
            add_bos && bos.is_some(),
            chat_template,
        ))
    }

    fn finish(
        inner: Tokenizer,
        path: &Path,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
        chat_template: Option<String>,
    ) -> Self {
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        for t in END_OF_TURN {
            if let Some(id) = inner.token_to_id(t) {
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        Self {
            inner,
            source: path.to_path_buf(),
            bos,
            eos,
            add_bos,
            stop_ids,
            chat_template,
        }
    }

    /// Token ids of `text` (special tokens written in the text are recognised), with the BOS
    /// token first when the model asks for it and `with_bos` is set.
    pub fn encode(&self, text: &str, with_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| DataError::Tokenizer {
                path: self.source.clone(),
                message: format!("cannot tokenize: {e}"),
            })?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if with_bos && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| DataError::Tokenizer {
                path: self.source.clone(),
                message: format!("cannot decode: {e}"),
            })
    }

    /// Tokens including added (special) tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokens of the model vocabulary proper, without added tokens.
    pub fn base_vocab_size(&self) -> usize {
        self.inner.get_vocab_size(false)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The underlying `tokenizers` object (for saving next to a model).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Renders `messages` with the model's chat template. `add_generation_prompt` appends the
    /// opening of the assistant's turn.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| DataError::Tokenizer {
                path: self.source.clone(),
                message: "the model has no chat template".into(),
            })?;
        let token = |id: Option<u32>| {
            id.and_then(|i| self.inner.id_to_token(i))
                .unwrap_or_default()
        };
        render_template(
            template,
            messages,
            add_generation_prompt,
            &token(self.bos),
            &token(self.eos),
        )
        .map_err(|message| DataError::Tokenizer {
            path: self.source.clone(),
            message: format!("chat template: {message}"),
        })
    }
}

/// Llama 3's pre-tokenizer split.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Renders a Hugging Face chat template (Jinja) with Python-compatible string methods.
pub fn render_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> std::result::Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    let tmpl = env.template_from_str(template).map_err(|e| e.to_string())?;
    tmpl.render(minijinja::context! {
        messages => minijinja::Value::from(
            messages
                .iter()
                .map(|m| {
                    minijinja::Value::from_pairs([
                        ("role", m.role.as_str()),
                        ("content", m.content.as_str()),
                    ])
                })
                .collect::<Vec<_>>()
        ),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| e.to_string())
}

/// Checks that every message has a known role and text, naming the first that does not.
pub fn validate_messages(messages: &[Message], source: &str) -> Result<()> {
    if messages.is_empty() {
        return Err(DataError::Invalid(format!(
            "{source}: a conversation with no messages"
        )));
    }
    for (i, m) in messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(DataError::Invalid(format!(
                "{source}: message {} has role `{}`; expected one of {}",
                i + 1,
                m.role,
                ROLES.join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_renders_python_style_methods() {
        let t = "{% for m in messages %}<{{ m.role }}>{{ m['content'].strip() }}\n{% endfor %}\
                 {% if add_generation_prompt %}<assistant>{% endif %}";
        let out = render_template(t, &[Message::new("user", "  hi  ")], true, "", "").unwrap();
        assert_eq!(out, "<user>hi\n<assistant>");
    }

    #[test]
    fn template_errors_are_reported() {
        let t = "{{ raise_exception('roles must alternate') }}";
        let e = render_template(t, &[Message::new("user", "x")], false, "", "").unwrap_err();
        assert!(e.contains("roles must alternate"), "{e}");
        assert!(render_template("{% for %}", &[], false, "", "").is_err());
    }

    #[test]
    fn unknown_roles_are_refused() {
        let e = validate_messages(&[Message::new("wizard", "x")], "chat.jsonl line 3").unwrap_err();
        assert!(e.to_string().contains("role `wizard`"), "{e}");
    }
}
