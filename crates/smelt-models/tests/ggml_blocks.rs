//! Block decoding of every quantized GGML type against the `gguf` Python package
//! (fixture from `scripts/reference/make_ggml_block_fixtures.py`), and the quantized
//! matrix-vector kernels against the decoded values.

use smelt_models::quant::{GgmlType, QMatrix};

fn fixture() -> serde_json::Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ggml_blocks.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn every_block_type_decodes_like_the_reference() {
    let f = fixture();
    for ty in GgmlType::ALL.iter().filter(|t| t.is_quantized()) {
        let case = &f[ty.name()];
        let bytes = hex(case["hex"].as_str().unwrap());
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got = smelt_models::quant::dequantize(*ty, &bytes);
        assert_eq!(got.len(), want.len(), "{}", ty.name());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
                "{} value {i}: {g} vs {w}",
                ty.name()
            );
        }
        // The same two blocks as one row of a matrix: the decoding kernels agree.
        let cols = want.len();
        let m = QMatrix::new(*ty, 1, cols, bytes).unwrap();
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 37) % 11) as f32 / 11.0 - 0.5)
            .collect();
        let expect: f32 = want.iter().zip(&x).map(|(a, b)| a * b).sum();
        let y = m.matmul(&x, 1)[0];
        let scale: f32 = want.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
        assert!(
            (y - expect).abs() <= 1e-5 * (1.0 + scale),
            "{}: {y} vs {expect}",
            ty.name()
        );
    }
}
