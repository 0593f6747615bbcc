//! Causal language models against PyTorch `transformers` (fixtures written by
//! `scripts/reference/make_lm_fixtures.py`): SmolLM2 from its Q4_1 GGUF (tokenizer, top
//! logits, greedy continuations, likelihood, chat template), a random-weight GPT-2 checkpoint
//! (logits, greedy continuation) and the GPT-2 tokenizer.

use burn::tensor::Device;
use serde_json::Value;
use smelt_data::lm_tokenizer::{LmTokenizer, Message};
use smelt_models::causal::{CausalLm, KvCache, Step};
use smelt_models::weights::tensor_to_vec;
use smelt_tasks::lm::{generate, GenerateOptions, LanguageModel, Sampling};
use std::path::PathBuf;
use std::sync::OnceLock;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A JSON list of rows of numbers, flattened.
fn matrix(v: &Value) -> Vec<f32> {
    let rows = v.as_array().unwrap().iter();
    rows.flat_map(|r| {
        r.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
    })
    .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn smollm() -> &'static LanguageModel {
    static LM: OnceLock<LanguageModel> = OnceLock::new();
    LM.get_or_init(|| {
        let dir =
            smelt_data::assets::locate("models/smollm2-135m-instruct-q4_1").expect("SmolLM2 asset");
        LanguageModel::load(
            &dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
            None,
            &Device::flex(),
        )
        .unwrap()
    })
}

#[test]
fn smollm_tokenizer_matches_reference() {
    let r = json("smollm2_reference.json");
    let lm = smollm();
    for t in r["tokenize"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        assert_eq!(
            lm.tokenizer.encode(text, false).unwrap(),
            ids(&t["ids"]),
            "{text:?}"
        );
    }
}

#[test]
fn smollm_logits_and_greedy_continuations_match_reference() {
    let r = json("smollm2_reference.json");
    let lm = smollm();
    for p in r["prompts"].as_array().unwrap() {
        let prompt = ids(&p["ids"]);
        assert_eq!(
            lm.tokenizer
                .encode(p["prompt"].as_str().unwrap(), true)
                .unwrap(),
            prompt
        );
        let mut cache = KvCache::new();
        let logits = tensor_to_vec(
            lm.model
                .last_logits(&Step::single(&prompt, 0), &mut cache)
                .unwrap(),
        )
        .unwrap();
        let top = ids(&p["top_ids"]);
        let top_logits: Vec<f64> = p["top_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for (id, want) in top.iter().zip(&top_logits) {
            let got = logits[*id as usize] as f64;
            assert!(
                (got - want).abs() < 2e-3,
                "prompt {:?}: logit of {id}: {got} vs {want}",
                p["prompt"]
            );
        }
        let best = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(best as u32, top[0]);

        let want = ids(&p["greedy"]);
        let options = GenerateOptions {
            max_new_tokens: want.len(),
            sampling: Sampling::greedy(),
            stop: vec![],
            ignore_eos: true,
        };
        let (gens, _) = generate(lm, &[prompt.clone()], &options, |_, _| {}).unwrap();
        // Greedy decoding amplifies rounding differences only at near-ties; the first 32 tokens
        // must agree exactly (in practice 33 to 40 of the 40 stored do).
        let agree = gens[0]
            .tokens
            .iter()
            .zip(&want)
            .take_while(|(a, b)| a == b)
            .count();
        assert!(want.len() >= 32);
        assert!(
            agree >= 32,
            "greedy continuation of {:?} agrees for {agree} tokens:\n{:?}\n{:?}",
            p["prompt"],
            gens[0].tokens,
            want
        );
    }
}

#[test]
fn smollm_batched_generation_equals_one_by_one() {
    let lm = smollm();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "Once upon a time, in a small village by the sea,",
    ]
    .iter()
    .map(|p| lm.tokenizer.encode(p, true).unwrap())
    .collect();
    assert_ne!(
        prompts[0].len(),
        prompts[1].len(),
        "the batch must need padding"
    );
    let options = GenerateOptions {
        max_new_tokens: 12,
        sampling: Sampling::greedy(),
        stop: vec![],
        ignore_eos: true,
    };
    let (batched, _) = generate(lm, &prompts, &options, |_, _| {}).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let (single, _) = generate(lm, &[p.clone()], &options, |_, _| {}).unwrap();
        assert_eq!(batched[i].tokens, single[0].tokens, "prompt {i}");
    }
}

#[test]
fn smollm_likelihood_and_chat_template_match_reference() {
    let r = json("smollm2_reference.json");
    let lm = smollm();
    let text = r["nll"]["text"].as_str().unwrap();
    let ids = lm.tokenizer.encode(text, true).unwrap();
    assert_eq!(ids.len() as u64, r["nll"]["tokens"].as_u64().unwrap());
    let mut cache = KvCache::new();
    let h = lm
        .model
        .forward_hidden(&Step::single(&ids, 0), &mut cache)
        .unwrap();
    let [_, t, d] = h.dims();
    let logits = tensor_to_vec(lm.model.logits(h.reshape([t, d]))).unwrap();
    let v = lm.model.config.vocab_size;
    let mut nll = 0f64;
    for i in 0..t - 1 {
        let row = &logits[i * v..(i + 1) * v];
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = max
            + row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        nll += lse - row[ids[i + 1] as usize] as f64;
    }
    let mean = nll / (t - 1) as f64;
    let want = r["nll"]["mean_nll"].as_f64().unwrap();
    assert!((mean - want).abs() < 1e-3, "mean NLL {mean} vs {want}");

    let messages: Vec<Message> = serde_json::from_value(r["chat"]["messages"].clone()).unwrap();
    let rendered = lm.tokenizer.render_chat(&messages, true).unwrap();
    assert_eq!(rendered, r["chat"]["rendered"].as_str().unwrap());
}

#[test]
fn stop_strings_end_generation_before_the_stop_text() {
    let lm = smollm();
    let prompt = lm
        .tokenizer
        .encode("The capital of France is", true)
        .unwrap();
    let options = GenerateOptions {
        max_new_tokens: 40,
        sampling: Sampling::greedy(),
        stop: vec!["answer".into()],
        ignore_eos: true,
    };
    let mut streamed = String::new();
    let (gens, _) = generate(lm, &[prompt], &options, |_, t| streamed.push_str(t)).unwrap();
    // The reference continuation is " Paris.\n\nThe answer is: ..."
    assert_eq!(gens[0].text, " Paris.\n\nThe ");
    assert_eq!(
        streamed, gens[0].text,
        "streamed text never includes the stop string"
    );
    assert_eq!(gens[0].finish, smelt_tasks::lm::Finish::Stop);
}

#[test]
fn tiny_gpt2_matches_reference() {
    let r = json("tiny_gpt2_reference.json");
    let model = CausalLm::load_hf(&fixtures().join("tiny-gpt2"), &Device::flex()).unwrap();
    let input = ids(&r["ids"]);
    let mut cache = KvCache::new();
    let h = model
        .forward_hidden(&Step::single(&input, 0), &mut cache)
        .unwrap();
    let [_, t, d] = h.dims();
    let logits = tensor_to_vec(model.logits(h.reshape([t, d]))).unwrap();
    let want = matrix(&r["logits"]);
    let err = max_diff(&logits, &want);
    assert!(err < 1e-4, "max logit difference {err}");

    // Greedy continuation with the KV cache, token by token.
    let mut tokens = input.clone();
    let mut cache = KvCache::new();
    let mut step = Step::single(&input, 0);
    let mut out = Vec::new();
    for _ in 0..r["greedy"].as_array().unwrap().len() {
        let l = tensor_to_vec(model.last_logits(&step, &mut cache).unwrap()).unwrap();
        let next = l
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        out.push(next);
        step = Step::single(&[next], tokens.len());
        tokens.push(next);
    }
    assert_eq!(out, ids(&r["greedy"]));
}

#[test]
fn gpt2_tokenizer_matches_reference() {
    let dir = smelt_data::assets::locate("models/gpt2-tokenizer").expect("GPT-2 tokenizer asset");
    let tok = LmTokenizer::from_hf(&dir).unwrap();
    for t in json("gpt2_tokenizer_reference.json").as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids(&t["ids"]), "{text:?}");
    }
    assert_eq!(
        tok.decode(&tok.encode("naïve café 🙂", false).unwrap(), false)
            .unwrap(),
        "naïve café 🙂"
    );
}

#[test]
fn host_path_equals_tensor_path_for_gpt2_layout() {
    let model = CausalLm::load_hf(&fixtures().join("tiny-gpt2"), &Device::flex()).unwrap();
    let host = smelt_models::host_decode::HostModel::new(&model).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 97 + 5) % 384).collect();
    let mut hc = host.new_cache();
    let mut tc = KvCache::new();
    // A prompt of six, then single steps (past 16 positions the team shares the heads).
    let mut chunks: Vec<&[u32]> = vec![&tokens[..6]];
    chunks.extend(tokens[6..].chunks(1));
    let mut start = 0;
    for c in chunks {
        let a = host.forward(c, &mut hc).unwrap();
        let b =
            tensor_to_vec(model.last_logits(&Step::single(c, start), &mut tc).unwrap()).unwrap();
        let err = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-4, "after {} tokens: {err}", start + c.len());
        start += c.len();
    }
    assert_eq!(hc.len(), tokens.len());
}

#[test]
fn tiny_llama_bf16_matches_reference_and_round_trips_through_export() {
    let r = json("tiny_llama_reference.json");
    let model = CausalLm::load_hf(&fixtures().join("tiny-llama"), &Device::flex()).unwrap();
    assert_eq!(model.config.kv_heads, 2);
    assert!(!model.config.tie_embeddings);
    let input = ids(&r["ids"]);
    let logits_of = |m: &CausalLm| {
        let mut cache = KvCache::new();
        let h = m
            .forward_hidden(&Step::single(&input, 0), &mut cache)
            .unwrap();
        let [_, t, d] = h.dims();
        tensor_to_vec(m.logits(h.reshape([t, d]))).unwrap()
    };
    let logits = logits_of(&model);
    let want = matrix(&r["logits"]);
    let err = max_diff(&logits, &want);
    assert!(err < 1e-4, "max logit difference {err}");

    // The host path agrees, and an exported directory loads back to the same logits.
    let host = smelt_models::host_decode::HostModel::new(&model).unwrap();
    let last = host.forward(&input, &mut host.new_cache()).unwrap();
    let v = model.config.vocab_size;
    let tail = &logits[(input.len() - 1) * v..];
    assert!(last.iter().zip(tail).all(|(a, b)| (a - b).abs() < 1e-4));
    let tmp = tempfile::tempdir().unwrap();
    smelt_models::weights::write_safetensors(
        &tmp.path().join("model.safetensors"),
        &model.export_hf().unwrap(),
        None,
    )
    .unwrap();
    let config = smelt_models::causal::hf_config_json(&model.config);
    std::fs::write(tmp.path().join("config.json"), config.to_string()).unwrap();
    let again = CausalLm::load_hf(tmp.path(), &Device::flex()).unwrap();
    assert_eq!(again.config, model.config);
    let err = logits_of(&again)
        .iter()
        .zip(&logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-6, "round trip changed logits by {err}");
}
