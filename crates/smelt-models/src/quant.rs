//! GGML tensor types: block layouts, dequantization, quantization, and the kernels that
//! multiply activations by quantized weights without ever materialising the f32 matrix.
//!
//! A quantized matrix is stored row-major as in GGUF: each row of `cols` weights is a run of
//! blocks, `cols / block_size` of them, `type_size` bytes each. Kernels decode one block at a
//! time into registers (or a small stack buffer) and accumulate against f32 activations, so the
//! results equal "dequantize, then multiply in f32" up to summation order.

use half::{bf16, f16};
use rayon::prelude::*;

/// The tensor types smelt reads from GGUF files, with their GGML type ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    /// Every supported type, for listings and tests.
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Bf16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// The type with GGML id `id`, or `None` for ids smelt does not read.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::Bf16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Bf16 => 30,
        }
    }

    /// The name GGUF tools print (`Q4_K`, `BF16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Bf16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// Weights per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::Bf16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes of a row of `cols` weights, or `None` when `cols` is not a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        if cols % self.block_size() != 0 {
            return None;
        }
        (cols / self.block_size()).checked_mul(self.type_size())
    }
}

#[inline(always)]
fn half(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Decodes one block of `ty` (`ty.type_size()` bytes) into `out` (`ty.block_size()` values).
#[inline(always)]
pub fn dequantize_block(ty: GgmlType, b: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => out[0] = half(b, 0),
        GgmlType::Bf16 => out[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => {
            let d = half(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                out[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
                out[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let d = half(b, 0);
            let m = half(b, 2);
            let qs = &b[4..20];
            for j in 0..16 {
                out[j] = (qs[j] & 0x0f) as f32 * d + m;
                out[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        GgmlType::Q5_0 => {
            let d = half(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = &b[6..22];
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                out[j] = (((qs[j] & 0x0f) as u32 | h0) as i32 - 16) as f32 * d;
                out[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
            }
        }
        GgmlType::Q5_1 => {
            let d = half(b, 0);
            let m = half(b, 2);
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let qs = &b[8..24];
            for j in 0..16 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                out[j] = ((qs[j] & 0x0f) as u32 | h0) as f32 * d + m;
                out[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = half(b, 0);
            for j in 0..32 {
                out[j] = b[2 + j] as i8 as f32 * d;
            }
        }
        GgmlType::Q4K => {
            let d = half(b, 0);
            let dmin = half(b, 2);
            let scales = &b[4..16];
            let qs = &b[16..144];
            for chunk in 0..4 {
                let (s1, m1) = scale_min_k4(2 * chunk, scales);
                let (s2, m2) = scale_min_k4(2 * chunk + 1, scales);
                let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                let q = &qs[32 * chunk..32 * chunk + 32];
                let y = &mut out[64 * chunk..64 * chunk + 64];
                for l in 0..32 {
                    y[l] = d1 * (q[l] & 0x0f) as f32 - m1;
                    y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }
        GgmlType::Q5K => {
            let d = half(b, 0);
            let dmin = half(b, 2);
            let scales = &b[4..16];
            let qh = &b[16..48];
            let qs = &b[48..176];
            for chunk in 0..4 {
                let (s1, m1) = scale_min_k4(2 * chunk, scales);
                let (s2, m2) = scale_min_k4(2 * chunk + 1, scales);
                let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                let u1 = 1u8 << (2 * chunk);
                let u2 = 2u8 << (2 * chunk);
                let q = &qs[32 * chunk..32 * chunk + 32];
                let y = &mut out[64 * chunk..64 * chunk + 64];
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    y[l] = d1 * ((q[l] & 0x0f) + h1) as f32 - m1;
                    y[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
                }
            }
        }
        GgmlType::Q6K => {
            let ql = &b[0..128];
            let qh = &b[128..192];
            let sc = &b[192..208];
            let d = half(b, 208);
            for half_block in 0..2 {
                let ql = &ql[64 * half_block..];
                let qh = &qh[32 * half_block..];
                let sc = &sc[8 * half_block..];
                let y = &mut out[128 * half_block..128 * half_block + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K / Q5_K block.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantizes `data` (whole blocks of `ty`) into f32 values.
pub fn dequantize(ty: GgmlType, data: &[u8]) -> Vec<f32> {
    let (bs, ts) = (ty.block_size(), ty.type_size());
    let blocks = data.len() / ts;
    let mut out = vec![0f32; blocks * bs];
    out.par_chunks_mut(bs * 1024)
        .zip(data.par_chunks(ts * 1024))
        .for_each(|(o, d)| {
            for (ob, db) in o.chunks_exact_mut(bs).zip(d.chunks_exact(ts)) {
                dequantize_block(ty, db, ob);
            }
        });
    out
}

/// Quantizes `values` (a whole number of blocks) to `ty`. Supported targets: F32, F16, BF16,
/// Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (the K-quant encoders need an importance search that smelt
/// does not implement; those types are read-only).
pub fn quantize(ty: GgmlType, values: &[f32]) -> Option<Vec<u8>> {
    let bs = ty.block_size();
    if values.len() % bs != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(values.len() / bs * ty.type_size());
    for x in values.chunks_exact(bs) {
        match ty {
            GgmlType::F32 => out.extend_from_slice(&x[0].to_le_bytes()),
            GgmlType::F16 => out.extend_from_slice(&f16::from_f32(x[0]).to_le_bytes()),
            GgmlType::Bf16 => out.extend_from_slice(&bf16::from_f32(x[0]).to_le_bytes()),
            GgmlType::Q8_0 => {
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
            }
            GgmlType::Q4_0 | GgmlType::Q5_0 => {
                // The scale maps the value of largest magnitude to the most negative code.
                let max = x
                    .iter()
                    .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let (levels, offset) = if ty == GgmlType::Q4_0 {
                    (-8.0, 8.0)
                } else {
                    (-16.0, 16.0)
                };
                let d = max / levels;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let top = 2.0 * offset - 1.0;
                let q: Vec<u8> = x
                    .iter()
                    .map(|v| (v * id + offset + 0.5).clamp(0.0, top) as u8)
                    .collect();
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                push_nibbles(ty == GgmlType::Q5_0, &q, &mut out);
            }
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                let min = x.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                let max = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                let top = if ty == GgmlType::Q4_1 { 15.0 } else { 31.0 };
                let d = (max - min) / top;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<u8> = x
                    .iter()
                    .map(|v| ((v - min) * id + 0.5).clamp(0.0, top) as u8)
                    .collect();
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                push_nibbles(ty == GgmlType::Q5_1, &q, &mut out);
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => return None,
        }
    }
    Some(out)
}

/// Packs 32 codes as GGML does: low nibbles of codes 0..16 and 16..32 share bytes; for 5-bit
/// types the fifth bits go first, as a little-endian u32.
fn push_nibbles(five_bit: bool, q: &[u8], out: &mut Vec<u8>) {
    if five_bit {
        let mut qh = 0u32;
        for j in 0..16 {
            qh |= (((q[j] >> 4) & 1) as u32) << j;
            qh |= (((q[j + 16] >> 4) & 1) as u32) << (j + 16);
        }
        out.extend_from_slice(&qh.to_le_bytes());
    }
    for j in 0..16 {
        out.push((q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4));
    }
}

/// A weight matrix `[rows, cols]` kept in its GGML encoding.
#[derive(Clone)]
pub struct QMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: std::sync::Arc<Vec<u8>>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QMatrix({} [{}, {}])",
            self.ty.name(),
            self.rows,
            self.cols
        )
    }
}

impl QMatrix {
    /// Wraps `data` after checking that it holds exactly `rows` rows of `cols` weights.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: Vec<u8>) -> Option<Self> {
        let row = ty.row_bytes(cols)?;
        if row.checked_mul(rows)? != data.len() {
            return None;
        }
        Some(Self {
            ty,
            rows,
            cols,
            data: std::sync::Arc::new(data),
        })
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.type_size()
    }

    /// Bytes of one row.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// The whole matrix in f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        dequantize(self.ty, &self.data)
    }

    /// Dequantizes row `r` into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (bs, ts) = (self.ty.block_size(), self.ty.type_size());
        for (o, b) in out.chunks_exact_mut(bs).zip(self.row(r).chunks_exact(ts)) {
            dequantize_block(self.ty, b, o);
        }
    }

    /// A new matrix made of the rows `order[0]`, `order[1]`, ... of this one.
    pub fn permute_rows(&self, order: &[usize]) -> Self {
        let rb = self.row_bytes();
        let mut data = Vec::with_capacity(order.len() * rb);
        for &r in order {
            data.extend_from_slice(self.row(r));
        }
        Self {
            ty: self.ty,
            rows: order.len(),
            cols: self.cols,
            data: std::sync::Arc::new(data),
        }
    }

    /// `out[n, rows] = x[n, cols] · Wᵀ`.
    ///
    /// Few input rows (token-by-token decoding) take the fused decode-and-dot kernels, which
    /// read every weight once per input row; many rows (prompt processing, training)
    /// dequantize a tile of weight rows at a time into a cache-sized buffer and multiply it
    /// with a GEMM.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        matmul_group(&[self], x, n).pop().unwrap_or_default()
    }

    /// `out[n, cols] = g[n, rows] · W`: the product with the untransposed matrix, which is the
    /// gradient of [`QMatrix::matmul`] with respect to its input.
    pub fn matmul_transposed(&self, g: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(g.len(), n * self.rows, "gradient size must be n × rows");
        let (rows, cols) = (self.rows, self.cols);
        let mut out = vec![0f32; n * cols];
        // Row tiles of W are decoded (in parallel) into a reused buffer and accumulated with
        // a multithreaded GEMM: `out += g[:, tile] · W[tile, :]`. The matrix is never held in
        // f32 as a whole.
        let tile = TRANSPOSED_TILE_ROWS.min(rows).max(1);
        let mut buf = vec![0f32; tile * cols];
        for start in (0..rows).step_by(tile) {
            let len = tile.min(rows - start);
            buf[..len * cols]
                .par_chunks_mut(cols)
                .enumerate()
                .for_each(|(k, row)| self.dequantize_row(start + k, row));
            // SAFETY: `out` is n × cols, `g` is n × rows (row stride `rows`, offset `start`
            // columns), `buf` holds `len` rows of `cols`; all alive for the call.
            unsafe {
                gemm::gemm(
                    n,
                    cols,
                    len,
                    out.as_mut_ptr(),
                    1,
                    cols as isize,
                    start > 0,
                    g.as_ptr().add(start),
                    1,
                    rows as isize,
                    buf.as_ptr(),
                    1,
                    cols as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(rayon::current_num_threads()),
                );
            }
        }
        out
    }

    fn matmul_tiled(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        if self.ty == GgmlType::F32 && self.data.as_ptr() as usize % 4 == 0 {
            // Already f32: one multithreaded GEMM straight from the stored rows.
            // SAFETY: the bytes are `rows × cols` little-endian f32 values (checked at
            // construction), suitably aligned (checked above), and x86/ARM are little-endian.
            unsafe {
                gemm::gemm(
                    n,
                    rows,
                    cols,
                    out.as_mut_ptr(),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    self.data.as_ptr() as *const f32,
                    cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(rayon::current_num_threads()),
                );
            }
            return;
        }
        let tile = TILE_ROWS.min(rows);
        let tiles = rows.div_ceil(tile);
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..tiles).into_par_iter().for_each_init(
            || vec![0f32; tile * cols],
            |buf, t| {
                let start = t * tile;
                let len = tile.min(rows - start);
                for k in 0..len {
                    self.dequantize_row(start + k, &mut buf[k * cols..(k + 1) * cols]);
                }
                let out_ptr = &out_ptr;
                // SAFETY: tile `t` writes only the columns start..start+len of every output
                // row; tiles are disjoint, and `out` outlives the parallel loop.
                unsafe {
                    gemm::gemm(
                        n,
                        len,
                        cols,
                        out_ptr.0.add(start),
                        1,
                        rows as isize,
                        false,
                        x.as_ptr(),
                        1,
                        cols as isize,
                        buf.as_ptr(),
                        cols as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            },
        );
    }
}

/// Whether decoding kernels multiply by f32 activations (exactly "dequantize, then multiply",
/// the default) instead of activations quantized to 8 bits per block of 32, as llama.cpp
/// does. The 8-bit path is faster; its results differ from the f32 product by the rounding
/// of the activations (relative error about 0.4 % per element), enough to change greedy
/// continuations after a few tokens.
static EXACT_ACTIVATIONS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Chooses f32 (`true`, the default) or 8-bit (`false`) activations for the decoding kernels.
pub fn set_exact_activations(exact: bool) {
    EXACT_ACTIVATIONS.store(exact, std::sync::atomic::Ordering::Relaxed);
}

pub fn exact_activations() -> bool {
    EXACT_ACTIVATIONS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Activations quantized per block of 32: `q = round(x / d)` with `d = max|x| / 127`.
pub struct Q8Acts {
    pub qs: Vec<i8>,
    /// Scale of each block.
    pub d: Vec<f32>,
    /// `d · Σ q` of each block (for the offset of Q4_1 / Q5_1 weights).
    pub sum: Vec<f32>,
    /// `Σ q` of each block (for the +8 of Q4_0 codes).
    pub isum: Vec<i32>,
}

impl Q8Acts {
    pub fn new(x: &[f32]) -> Self {
        let blocks = x.len() / 32;
        let mut a = Q8Acts {
            qs: vec![0; blocks * 32],
            d: vec![0.0; blocks],
            sum: vec![0.0; blocks],
            isum: vec![0; blocks],
        };
        for (b, xb) in x.chunks_exact(32).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut isum = 0i32;
            for (q, v) in a.qs[b * 32..b * 32 + 32].iter_mut().zip(xb) {
                *q = (v * id).round() as i8;
                isum += *q as i32;
            }
            a.d[b] = d;
            a.isum[b] = isum;
            a.sum[b] = d * isum as f32;
        }
        a
    }
}

/// Whether `ty` has an 8-bit-activation kernel.
fn has_int8_kernel(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0) && kernels::int8_available()
}

/// `x[n, cols]` times the transpose of each matrix (all with `cols` columns), computed in one
/// parallel pass over their rows, so that the projections sharing an input (Q, K and V; gate
/// and up) cost one scheduling round instead of several.
pub fn matmul_group(ms: &[&QMatrix], x: &[f32], n: usize) -> Vec<Vec<f32>> {
    matmul_group_with(ms, x, n, exact_activations())
}

/// [`matmul_group`] with the activation precision given (`exact`: f32 activations).
pub fn matmul_group_with(ms: &[&QMatrix], x: &[f32], n: usize, exact: bool) -> Vec<Vec<f32>> {
    let cols = ms.first().map(|m| m.cols).unwrap_or(0);
    assert!(
        ms.iter().all(|m| m.cols == cols),
        "grouped matrices share their input"
    );
    assert_eq!(x.len(), n * cols, "activation size must be n × cols");
    if n >= GEMM_MIN_ROWS {
        return ms
            .iter()
            .map(|m| {
                let mut out = vec![0f32; n * m.rows];
                m.matmul_tiled(x, n, &mut out);
                out
            })
            .collect();
    }
    let acts: Vec<Option<Q8Acts>> =
        if !exact && cols % 32 == 0 && ms.iter().any(|m| has_int8_kernel(m.ty)) {
            (0..n)
                .map(|i| Some(Q8Acts::new(&x[i * cols..(i + 1) * cols])))
                .collect()
        } else {
            (0..n).map(|_| None).collect()
        };
    let total: usize = ms.iter().map(|m| m.rows).sum();
    let chunk = total
        .div_ceil(rayon::current_num_threads().max(1) * 4)
        .max(32);
    // Output in [rows, n] order per matrix; transposed below when n > 1.
    let mut outs: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; m.rows * n]).collect();
    let mut tasks: Vec<(&QMatrix, usize, &mut [f32])> = Vec::new();
    for (m, out) in ms.iter().zip(outs.iter_mut()) {
        for (c, o) in out.chunks_mut(chunk * n).enumerate() {
            tasks.push((m, c * chunk, o));
        }
    }
    tasks.into_par_iter().for_each(|(m, start, o)| {
        let int8 = has_int8_kernel(m.ty);
        for (k, orow) in o.chunks_exact_mut(n).enumerate() {
            let w = m.row(start + k);
            for (i, v) in orow.iter_mut().enumerate() {
                *v = match (&acts[i], int8) {
                    (Some(a), true) => kernels::dot_row_q8(m.ty, w, a),
                    _ => kernels::dot_row(m.ty, w, &x[i * cols..(i + 1) * cols]),
                };
            }
        }
    });
    if n > 1 {
        for (m, out) in ms.iter().zip(outs.iter_mut()) {
            let mut t = vec![0f32; n * m.rows];
            for r in 0..m.rows {
                for i in 0..n {
                    t[i * m.rows + r] = out[r * n + i];
                }
            }
            *out = t;
        }
    }
    outs
}

/// One activation row times the transpose of each matrix, split across a [`Team`]
/// (contiguous shares of all the matrices' rows): the decoding kernel launch without a
/// work-stealing pool's wake-ups.
///
/// [`Team`]: crate::team::Team
pub fn matvec_team(team: &crate::team::Team, ms: &[&QMatrix], x: &[f32]) -> Vec<Vec<f32>> {
    let cols = ms.first().map(|m| m.cols).unwrap_or(0);
    assert!(
        ms.iter().all(|m| m.cols == cols),
        "grouped matrices share their input"
    );
    assert_eq!(x.len(), cols, "one activation row");
    let acts = (!exact_activations() && cols % 32 == 0 && ms.iter().any(|m| has_int8_kernel(m.ty)))
        .then(|| Q8Acts::new(x));
    // Sums of `x` per block of 32, shared by every row (the offset term of Q4_1).
    let block_sums: Vec<f32> = x.chunks_exact(32).map(|b| b.iter().sum()).collect();
    let mut outs: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; m.rows]).collect();
    let ptrs: Vec<SendPtr> = outs.iter_mut().map(|o| SendPtr(o.as_mut_ptr())).collect();
    let mut offsets = Vec::with_capacity(ms.len() + 1);
    offsets.push(0usize);
    for m in ms {
        offsets.push(offsets.last().copied().unwrap_or(0) + m.rows);
    }
    let total = *offsets.last().unwrap_or(&0);
    // Rows are handed out in small chunks from a shared counter, so a member that runs slower
    // (a busier core, a colder cache) takes fewer of them instead of holding the others up,
    // and the last chunk, for which the others wait, is short.
    let chunk = (total / (team.threads() * 16)).clamp(16, 1024) / 4 * 4;
    let next = std::sync::atomic::AtomicUsize::new(0);
    team.run(&|_, _| loop {
        let start = next.fetch_add(chunk, std::sync::atomic::Ordering::Relaxed);
        if start >= total {
            break;
        }
        let end = (start + chunk).min(total);
        let mut mi = offsets.partition_point(|&o| o <= start).saturating_sub(1);
        let mut g = start;
        while g < end {
            while g >= offsets[mi + 1] {
                mi += 1;
            }
            let m = ms[mi];
            let (r0, r1) = (g - offsets[mi], end.min(offsets[mi + 1]) - offsets[mi]);
            // SAFETY: every global row belongs to exactly one chunk, so each output element
            // is written once, and `outs` outlives `run`.
            let out = unsafe { std::slice::from_raw_parts_mut(ptrs[mi].0.add(r0), r1 - r0) };
            match &acts {
                Some(a) if has_int8_kernel(m.ty) => {
                    for (r, o) in (r0..r1).zip(out.iter_mut()) {
                        *o = kernels::dot_row_q8(m.ty, m.row(r), a);
                    }
                }
                _ => kernels::dot_rows(m, r0, x, &block_sums, out),
            }
            g += r1 - r0;
        }
    });
    outs
}

/// Input rows from which [`QMatrix::matmul`] switches to dequantized tiles and a GEMM.
const GEMM_MIN_ROWS: usize = 6;
/// Weight rows dequantized per GEMM tile.
const TILE_ROWS: usize = 64;
/// Weight rows decoded per step of the transposed product (the input gradient).
const TRANSPOSED_TILE_ROWS: usize = 1024;

struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Row-times-vector kernels, compiled once per instruction set and chosen at run time.
mod kernels {
    use super::{dequantize_block, half, GgmlType};

    /// Whether the 8-bit-activation kernels can run on this CPU.
    pub fn int8_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Dot product of one quantized row with 8-bit activations (see [`super::Q8Acts`]).
    /// Only for types where [`super::has_int8_kernel`] holds.
    #[inline]
    pub fn dot_row_q8(ty: GgmlType, w: &[u8], a: &super::Q8Acts) -> f32 {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: callers check `int8_available` (through `has_int8_kernel`).
            unsafe {
                match ty {
                    GgmlType::Q4_1 => avx2::q4_1_q8(w, a),
                    GgmlType::Q4_0 => avx2::q4_0_q8(w, a),
                    GgmlType::Q8_0 => avx2::q8_0_q8(w, a),
                    _ => unreachable!("no 8-bit kernel for {}", ty.name()),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (w, a);
            unreachable!("no 8-bit kernel for {}", ty.name())
        }
    }

    /// f32 values of all 65,536 f16 bit patterns: the four-row kernels look block scales up
    /// here (two loads, no arithmetic) and read the blocks as stored.
    fn f16_table() -> &'static [f32] {
        static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
        TABLE.get_or_init(|| {
            (0..=u16::MAX)
                .map(|b| half::f16::from_bits(b).to_f32())
                .collect()
        })
    }

    /// `out[i] = row (r0 + i) · x` for consecutive rows of `m`; `sums` holds the sums of `x`
    /// per block of 32. Groups of four rows go to four-row kernels where the CPU and the
    /// type have one: `x` is loaded once per block for all four, and four independent
    /// accumulator chains keep the FMA units busy.
    pub fn dot_rows(m: &super::QMatrix, r0: usize, x: &[f32], sums: &[f32], out: &mut [f32]) {
        let done = rows4_where_available(m, r0, x, sums, out);
        for (i, o) in out[done..].iter_mut().enumerate() {
            *o = dot_row(m.ty, m.row(r0 + done + i), x);
        }
    }

    /// Runs the four-row kernels over the leading multiple of four of `out` where the CPU
    /// and the type have them; returns how many rows it did.
    fn rows4_where_available(
        m: &super::QMatrix,
        r0: usize,
        x: &[f32],
        sums: &[f32],
        out: &mut [f32],
    ) -> usize {
        #[cfg(target_arch = "x86_64")]
        if avx512::available() && matches!(m.ty, GgmlType::Q4_1 | GgmlType::Q8_0) {
            let groups = out.len() / 4;
            let rb = m.row_bytes();
            // The kernels read through raw pointers: check what they rely on (the fields of
            // a `QMatrix` are public, so its data may not match its shape).
            assert!(
                (r0 + 4 * groups) * rb <= m.data.len()
                    && x.len() == m.cols
                    && x.len() % 32 == 0
                    && rb == x.len() / 32 * m.ty.type_size()
                    && sums.len() * 32 >= x.len(),
                "four-row kernel: matrix, input and block sums disagree"
            );
            // SAFETY: `available` checked the features the kernels are compiled for; the
            // matrix holds rows `r0..r0 + 4 · groups` of `x.len()` weights, and `sums` one
            // value per block of `x`.
            unsafe {
                avx512::rows4(
                    m.ty,
                    &m.data,
                    r0,
                    rb,
                    f16_table(),
                    x,
                    sums,
                    &mut out[..4 * groups],
                );
            }
            return 4 * groups;
        }
        let _ = (m, r0, x, sums, out);
        0
    }

    /// Dot product of one quantized row with `x`.
    #[inline]
    pub fn dot_row(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                // SAFETY: the CPU supports the features the function is compiled for.
                return unsafe { dot_row_avx2(ty, w, x) };
            }
        }
        dot_row_generic(ty, w, x)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_row_avx2(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
        if avx512::available() {
            match ty {
                GgmlType::Q4_1 => return avx512::q4_1(w, x),
                GgmlType::Q8_0 => return avx512::q8_0(w, x),
                GgmlType::F32 => return avx512::f32(w, x),
                _ => {}
            }
        }
        match ty {
            GgmlType::Q4_1 => avx2::q4_1(w, x),
            GgmlType::Q4_0 => avx2::q4_0(w, x),
            GgmlType::Q8_0 => avx2::q8_0(w, x),
            GgmlType::F32 => avx2::f32(w, x),
            _ => dot_row_generic(ty, w, x),
        }
    }

    /// AVX-512 versions of the f32-activation kernels: sixteen lanes halve the instructions
    /// per block, which matters when two threads share a core's execution units.
    #[cfg(target_arch = "x86_64")]
    mod avx512 {
        use std::arch::x86_64::*;
        use std::sync::OnceLock;

        pub fn available() -> bool {
            static AVAILABLE: OnceLock<bool> = OnceLock::new();
            *AVAILABLE.get_or_init(|| {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("f16c")
                    && std::env::var_os("SMELT_NO_AVX512").is_none()
            })
        }

        #[inline(always)]
        unsafe fn f16_at(b: &[u8], at: usize) -> f32 {
            let bits = u16::from_le_bytes([b[at], b[at + 1]]);
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        }

        #[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
        pub unsafe fn q4_1(w: &[u8], x: &[f32]) -> f32 {
            let mut acc = _mm512_setzero_ps();
            let mut offset = _mm512_setzero_ps();
            let mask = _mm_set1_epi8(0x0f);
            for (b, xb) in w.chunks_exact(20).zip(x.chunks_exact(32)) {
                let d = _mm512_set1_ps(f16_at(b, 0));
                let m = _mm512_set1_ps(f16_at(b, 2));
                let q = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
                let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, mask)));
                let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(
                    _mm_srli_epi16(q, 4),
                    mask,
                )));
                let x0 = _mm512_loadu_ps(xb.as_ptr());
                let x1 = _mm512_loadu_ps(xb.as_ptr().add(16));
                let s = _mm512_fmadd_ps(lo, x0, _mm512_mul_ps(hi, x1));
                acc = _mm512_fmadd_ps(d, s, acc);
                offset = _mm512_fmadd_ps(m, _mm512_add_ps(x0, x1), offset);
            }
            _mm512_reduce_add_ps(_mm512_add_ps(acc, offset))
        }

        /// Four-row kernel over rows `r0..r0 + out.len()` (a multiple of four) of a matrix
        /// stored in `data` with `rb` bytes per row; Q4_1 or Q8_0 only.
        ///
        /// # Safety
        /// The CPU has the enabled features; `data` holds those rows of `x.len()` weights
        /// (`rb` bytes each), `lut` all 65,536 f16 values and `sums` one sum per block of 32
        /// values of `x`.
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
        pub unsafe fn rows4(
            ty: super::GgmlType,
            data: &[u8],
            r0: usize,
            rb: usize,
            lut: &[f32],
            x: &[f32],
            sums: &[f32],
            out: &mut [f32],
        ) {
            debug_assert!((r0 + out.len()) * rb <= data.len());
            let base = data.as_ptr().add(r0 * rb);
            let end = data.as_ptr() as usize + data.len();
            for (g, o) in out.chunks_exact_mut(4).enumerate() {
                let p = base.add(4 * g * rb);
                // Rows are a few cache lines long, too short for the hardware prefetcher to
                // ramp up on each: ask for the next group's lines (past this share of rows
                // too) while this one is computed (measured 20-25 % faster on a decoder
                // layer's matrices).
                let next = (p as usize + 4 * rb)..(p as usize + 8 * rb).min(end);
                for at in next.step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
                }
                let w = [p, p.add(rb), p.add(2 * rb), p.add(3 * rb)];
                let v = match ty {
                    super::GgmlType::Q4_1 => q4_1_x4(w, lut, x, sums),
                    _ => q8_0_x4(w, lut, x),
                };
                o.copy_from_slice(&v);
            }
        }

        /// Q4_1 times f32 for four rows, the block scales looked up in `lut` (f16 bits to
        /// f32): a table read costs two loads and no arithmetic, so the blocks are read as
        /// stored, 20 bytes each. Each byte's two codes are split after widening it to 32
        /// bits (a mask and a shift), one widening per block.
        #[inline(always)]
        unsafe fn q4_1_x4(w: [*const u8; 4], lut: &[f32], x: &[f32], sums: &[f32]) -> [f32; 4] {
            let blocks = x.len() / 32;
            let low = _mm512_set1_epi32(0x0f);
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut off = [0f32; 4];
            for b in 0..blocks {
                let xp = x.as_ptr().add(32 * b);
                let x0 = _mm512_loadu_ps(xp);
                let x1 = _mm512_loadu_ps(xp.add(16));
                let sx = *sums.get_unchecked(b);
                for r in 0..4 {
                    let blk = w[r].add(20 * b);
                    let d = *lut.get_unchecked(u16::from_le_bytes([*blk, *blk.add(1)]) as usize);
                    let m =
                        *lut.get_unchecked(u16::from_le_bytes([*blk.add(2), *blk.add(3)]) as usize);
                    let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(4) as *const __m128i));
                    let lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, low));
                    let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
                    let s = _mm512_fmadd_ps(lo, x0, _mm512_mul_ps(hi, x1));
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(d), s, acc[r]);
                    off[r] += m * sx;
                }
            }
            [
                _mm512_reduce_add_ps(acc[0]) + off[0],
                _mm512_reduce_add_ps(acc[1]) + off[1],
                _mm512_reduce_add_ps(acc[2]) + off[2],
                _mm512_reduce_add_ps(acc[3]) + off[3],
            ]
        }

        /// Q8_0 times f32 for four rows, the block scales looked up in `lut`.
        #[inline(always)]
        unsafe fn q8_0_x4(w: [*const u8; 4], lut: &[f32], x: &[f32]) -> [f32; 4] {
            let blocks = x.len() / 32;
            let mut acc = [_mm512_setzero_ps(); 4];
            for b in 0..blocks {
                let xp = x.as_ptr().add(32 * b);
                let x0 = _mm512_loadu_ps(xp);
                let x1 = _mm512_loadu_ps(xp.add(16));
                for r in 0..4 {
                    let blk = w[r].add(34 * b);
                    let d = *lut.get_unchecked(u16::from_le_bytes([*blk, *blk.add(1)]) as usize);
                    let q0 = _mm_loadu_si128(blk.add(2) as *const __m128i);
                    let q1 = _mm_loadu_si128(blk.add(18) as *const __m128i);
                    let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0));
                    let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1));
                    let s = _mm512_fmadd_ps(w0, x0, _mm512_mul_ps(w1, x1));
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(d), s, acc[r]);
                }
            }
            [
                _mm512_reduce_add_ps(acc[0]),
                _mm512_reduce_add_ps(acc[1]),
                _mm512_reduce_add_ps(acc[2]),
                _mm512_reduce_add_ps(acc[3]),
            ]
        }

        #[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
        pub unsafe fn f32(w: &[u8], x: &[f32]) -> f32 {
            let n = x.len();
            let wp = w.as_ptr() as *const f32;
            let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut i = 0;
            while i + 32 <= n {
                a0 = _mm512_fmadd_ps(
                    _mm512_loadu_ps(wp.add(i)),
                    _mm512_loadu_ps(x.as_ptr().add(i)),
                    a0,
                );
                a1 = _mm512_fmadd_ps(
                    _mm512_loadu_ps(wp.add(i + 16)),
                    _mm512_loadu_ps(x.as_ptr().add(i + 16)),
                    a1,
                );
                i += 32;
            }
            let mut tail = 0f32;
            while i < n {
                tail += std::ptr::read_unaligned(wp.add(i)) * x[i];
                i += 1;
            }
            _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + tail
        }

        #[target_feature(enable = "avx512f,avx512bw,fma,f16c")]
        pub unsafe fn q8_0(w: &[u8], x: &[f32]) -> f32 {
            let mut acc = _mm512_setzero_ps();
            for (b, xb) in w.chunks_exact(34).zip(x.chunks_exact(32)) {
                let d = _mm512_set1_ps(f16_at(b, 0));
                let q0 = _mm_loadu_si128(b.as_ptr().add(2) as *const __m128i);
                let q1 = _mm_loadu_si128(b.as_ptr().add(18) as *const __m128i);
                let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0));
                let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1));
                let s = _mm512_fmadd_ps(
                    w0,
                    _mm512_loadu_ps(xb.as_ptr()),
                    _mm512_mul_ps(w1, _mm512_loadu_ps(xb.as_ptr().add(16))),
                );
                acc = _mm512_fmadd_ps(d, s, acc);
            }
            _mm512_reduce_add_ps(acc)
        }
    }

    /// Hand-written AVX2 kernels for the most common block types: the codes of a block are
    /// widened to f32 in registers and multiplied with the activations, one scale per block.
    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use std::arch::x86_64::*;

        #[inline(always)]
        unsafe fn f16_at(b: &[u8], at: usize) -> f32 {
            let bits = u16::from_le_bytes([b[at], b[at + 1]]);
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        }

        #[inline(always)]
        unsafe fn hsum(v: __m256) -> f32 {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }

        /// 16 packed bytes of nibbles to (codes 0..16, codes 16..32), each as 16 bytes.
        #[inline(always)]
        unsafe fn nibbles(qs: *const u8) -> (__m128i, __m128i) {
            let q = _mm_loadu_si128(qs as *const __m128i);
            let mask = _mm_set1_epi8(0x0f);
            (
                _mm_and_si128(q, mask),
                _mm_and_si128(_mm_srli_epi16(q, 4), mask),
            )
        }

        /// Σ codes[j]·x[j] for 16 unsigned byte codes and 16 activations.
        #[inline(always)]
        unsafe fn dot16_u8(codes: __m128i, x: *const f32, acc: __m256) -> __m256 {
            let a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
            let b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8)));
            let acc = _mm256_fmadd_ps(a, _mm256_loadu_ps(x), acc);
            _mm256_fmadd_ps(b, _mm256_loadu_ps(x.add(8)), acc)
        }

        /// Σ over 32 lanes of u8 `w` · i8 `x`, as 8 i32 partial sums.
        #[inline(always)]
        unsafe fn dot32_u8_i8(w: __m256i, x: __m256i) -> __m256i {
            let pairs = _mm256_maddubs_epi16(w, x);
            _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
        }

        /// 16 packed nibble bytes as 32 codes in order (low nibbles first).
        #[inline(always)]
        unsafe fn nibbles32(qs: *const u8) -> __m256i {
            let (lo, hi) = nibbles(qs);
            _mm256_set_m128i(hi, lo)
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn q4_1_q8(w: &[u8], a: &super::super::Q8Acts) -> f32 {
            let mut acc = _mm256_setzero_ps();
            let mut offset = 0f32;
            for (b, blk) in w.chunks_exact(20).enumerate() {
                let dw = f16_at(blk, 0);
                let mw = f16_at(blk, 2);
                let codes = nibbles32(blk.as_ptr().add(4));
                let xq = _mm256_loadu_si256(a.qs.as_ptr().add(32 * b) as *const __m256i);
                let s = _mm256_cvtepi32_ps(dot32_u8_i8(codes, xq));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * a.d[b]), s, acc);
                offset += mw * a.sum[b];
            }
            hsum(acc) + offset
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn q4_0_q8(w: &[u8], a: &super::super::Q8Acts) -> f32 {
            let mut acc = 0f32;
            let mut vacc = _mm256_setzero_ps();
            for (b, blk) in w.chunks_exact(18).enumerate() {
                let dw = f16_at(blk, 0);
                let codes = nibbles32(blk.as_ptr().add(2));
                let xq = _mm256_loadu_si256(a.qs.as_ptr().add(32 * b) as *const __m256i);
                let s = _mm256_cvtepi32_ps(dot32_u8_i8(codes, xq));
                let scale = dw * a.d[b];
                vacc = _mm256_fmadd_ps(_mm256_set1_ps(scale), s, vacc);
                // Codes carry +8.
                acc -= scale * 8.0 * a.isum[b] as f32;
            }
            hsum(vacc) + acc
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn q8_0_q8(w: &[u8], a: &super::super::Q8Acts) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for (b, blk) in w.chunks_exact(34).enumerate() {
                let dw = f16_at(blk, 0);
                let wq = _mm256_loadu_si256(blk.as_ptr().add(2) as *const __m256i);
                let xq = _mm256_loadu_si256(a.qs.as_ptr().add(32 * b) as *const __m256i);
                // |w| · (x with w's sign): u8 × i8 products equal w · x.
                let s = dot32_u8_i8(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * a.d[b]), _mm256_cvtepi32_ps(s), acc);
            }
            hsum(acc)
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn f32(w: &[u8], x: &[f32]) -> f32 {
            let n = x.len();
            let wp = w.as_ptr() as *const f32;
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 16 <= n {
                a0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(wp.add(i)),
                    _mm256_loadu_ps(x.as_ptr().add(i)),
                    a0,
                );
                a1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(wp.add(i + 8)),
                    _mm256_loadu_ps(x.as_ptr().add(i + 8)),
                    a1,
                );
                i += 16;
            }
            let mut tail = 0f32;
            while i < n {
                tail += std::ptr::read_unaligned(wp.add(i)) * x[i];
                i += 1;
            }
            hsum(_mm256_add_ps(a0, a1)) + tail
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn q4_1(w: &[u8], x: &[f32]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            let mut offset = _mm256_setzero_ps();
            for (b, xb) in w.chunks_exact(20).zip(x.chunks_exact(32)) {
                let d = _mm256_set1_ps(f16_at(b, 0));
                let m = _mm256_set1_ps(f16_at(b, 2));
                let (lo, hi) = nibbles(b.as_ptr().add(4));
                let xp = xb.as_ptr();
                let s = dot16_u8(lo, xp, _mm256_setzero_ps());
                let s = dot16_u8(hi, xp.add(16), s);
                acc = _mm256_fmadd_ps(d, s, acc);
                let sx = _mm256_add_ps(
                    _mm256_add_ps(_mm256_loadu_ps(xp), _mm256_loadu_ps(xp.add(8))),
                    _mm256_add_ps(_mm256_loadu_ps(xp.add(16)), _mm256_loadu_ps(xp.add(24))),
                );
                offset = _mm256_fmadd_ps(m, sx, offset);
            }
            hsum(_mm256_add_ps(acc, offset))
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn q4_0(w: &[u8], x: &[f32]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            let eight = _mm256_set1_ps(8.0);
            for (b, xb) in w.chunks_exact(18).zip(x.chunks_exact(32)) {
                let d = _mm256_set1_ps(f16_at(b, 0));
                let (lo, hi) = nibbles(b.as_ptr().add(2));
                let xp = xb.as_ptr();
                let s = dot16_u8(lo, xp, _mm256_setzero_ps());
                let s = dot16_u8(hi, xp.add(16), s);
                // Codes are stored plus 8: subtract 8·Σx.
                let sx = _mm256_add_ps(
                    _mm256_add_ps(_mm256_loadu_ps(xp), _mm256_loadu_ps(xp.add(8))),
                    _mm256_add_ps(_mm256_loadu_ps(xp.add(16)), _mm256_loadu_ps(xp.add(24))),
                );
                let s = _mm256_fnmadd_ps(eight, sx, s);
                acc = _mm256_fmadd_ps(d, s, acc);
            }
            hsum(acc)
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn q8_0(w: &[u8], x: &[f32]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for (b, xb) in w.chunks_exact(34).zip(x.chunks_exact(32)) {
                let d = _mm256_set1_ps(f16_at(b, 0));
                let q = b.as_ptr().add(2);
                let xp = xb.as_ptr();
                let mut s = _mm256_setzero_ps();
                for k in 0..4 {
                    let codes = _mm_loadl_epi64(q.add(8 * k) as *const __m128i);
                    let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
                    s = _mm256_fmadd_ps(v, _mm256_loadu_ps(xp.add(8 * k)), s);
                }
                acc = _mm256_fmadd_ps(d, s, acc);
            }
            hsum(acc)
        }
    }

    #[inline(always)]
    fn dot_row_generic(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
        match ty {
            GgmlType::Q4_1 => {
                let mut acc = [0f32; 16];
                let mut offset = 0f32;
                for (b, xb) in w.chunks_exact(20).zip(x.chunks_exact(32)) {
                    let d = half(b, 0);
                    let m = half(b, 2);
                    let qs = &b[4..20];
                    let mut s = [0f32; 16];
                    let mut sx = [0f32; 16];
                    for j in 0..16 {
                        s[j] = (qs[j] & 0x0f) as f32 * xb[j] + (qs[j] >> 4) as f32 * xb[j + 16];
                        sx[j] = xb[j] + xb[j + 16];
                    }
                    for j in 0..16 {
                        acc[j] += d * s[j];
                    }
                    offset += m * sx.iter().sum::<f32>();
                }
                acc.iter().sum::<f32>() + offset
            }
            GgmlType::Q4_0 => {
                let mut acc = [0f32; 16];
                for (b, xb) in w.chunks_exact(18).zip(x.chunks_exact(32)) {
                    let d = half(b, 0);
                    let qs = &b[2..18];
                    for j in 0..16 {
                        let lo = (qs[j] & 0x0f) as i32 - 8;
                        let hi = (qs[j] >> 4) as i32 - 8;
                        acc[j] += d * (lo as f32 * xb[j] + hi as f32 * xb[j + 16]);
                    }
                }
                acc.iter().sum()
            }
            GgmlType::Q8_0 => {
                let mut acc = [0f32; 32];
                for (b, xb) in w.chunks_exact(34).zip(x.chunks_exact(32)) {
                    let d = half(b, 0);
                    let mut s = [0f32; 32];
                    for j in 0..32 {
                        s[j] = (b[2 + j] as i8) as f32 * xb[j];
                    }
                    for j in 0..32 {
                        acc[j] += d * s[j];
                    }
                }
                acc.iter().sum()
            }
            GgmlType::F32 => {
                let mut acc = [0f32; 16];
                for (b, xb) in w.chunks_exact(64).zip(x.chunks_exact(16)) {
                    for j in 0..16 {
                        let v = f32::from_le_bytes([
                            b[4 * j],
                            b[4 * j + 1],
                            b[4 * j + 2],
                            b[4 * j + 3],
                        ]);
                        acc[j] += v * xb[j];
                    }
                }
                let done = x.len() / 16 * 16;
                let mut tail = 0f32;
                for i in done..x.len() {
                    let v =
                        f32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]]);
                    tail += v * x[i];
                }
                acc.iter().sum::<f32>() + tail
            }
            _ => {
                // Every other type: decode a block into a stack buffer, then a wide dot.
                let (bs, ts) = (ty.block_size(), ty.type_size());
                let mut buf = [0f32; 256];
                let mut acc = [0f32; 16];
                if bs >= 16 {
                    for (b, xb) in w.chunks_exact(ts).zip(x.chunks_exact(bs)) {
                        dequantize_block(ty, b, &mut buf[..bs]);
                        for (wc, xc) in buf[..bs].chunks_exact(16).zip(xb.chunks_exact(16)) {
                            for j in 0..16 {
                                acc[j] += wc[j] * xc[j];
                            }
                        }
                    }
                    acc.iter().sum()
                } else {
                    let mut total = 0f32;
                    for (b, xv) in w.chunks_exact(ts).zip(x) {
                        dequantize_block(ty, b, &mut buf[..1]);
                        total += buf[0] * xv;
                    }
                    total
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn quantize_round_trips_within_the_type_step() {
        let x = values(256, 7);
        for (ty, tol) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 1e-3),
            (GgmlType::Bf16, 8e-3),
            (GgmlType::Q8_0, 1.0 / 127.0),
            (GgmlType::Q5_0, 1.0 / 16.0),
            (GgmlType::Q5_1, 2.0 / 31.0),
            (GgmlType::Q4_0, 1.0 / 8.0),
            (GgmlType::Q4_1, 2.0 / 15.0),
        ] {
            let q = quantize(ty, &x).unwrap();
            assert_eq!(q.len(), ty.row_bytes(256).unwrap(), "{}", ty.name());
            let y = dequantize(ty, &q);
            let err = x
                .iter()
                .zip(&y)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            assert!(err <= tol * 1.01 + 1e-6, "{}: max error {err}", ty.name());
        }
    }

    #[test]
    fn matmul_paths_agree_with_dequantized_product() {
        let (rows, cols) = (70, 512);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::F16,
            GgmlType::F32,
        ] {
            let w = QMatrix::new(
                ty,
                rows,
                cols,
                quantize(ty, &values(rows * cols, 3)).unwrap(),
            )
            .unwrap();
            let dense = w.dequantize();
            for n in [1, 3, 9] {
                let x = values(n * cols, 11 + n as u32);
                let y = matmul_group_with(&[&w], &x, n, true).pop().unwrap();
                let y8 = matmul_group_with(&[&w], &x, n, false).pop().unwrap();
                for i in 0..n {
                    for r in 0..rows {
                        // 8-bit activations: error bounded by the rounding of x (d/2 per
                        // element, d = max|x|/127 per block) times the weights.
                        let bound: f32 = (0..cols).map(|k| dense[r * cols + k].abs()).sum::<f32>()
                            * (1.0 / 127.0 / 2.0)
                            + 1e-4;
                        let exact = y[i * rows + r];
                        assert!(
                            (y8[i * rows + r] - exact).abs() <= bound,
                            "{} n={n}: 8-bit {} vs {exact}",
                            ty.name(),
                            y8[i * rows + r]
                        );
                    }
                }
                for i in 0..n {
                    for r in 0..rows {
                        let want: f32 = (0..cols)
                            .map(|k| x[i * cols + k] * dense[r * cols + k])
                            .sum();
                        let got = y[i * rows + r];
                        assert!(
                            (want - got).abs() < 1e-3 * (1.0 + want.abs()),
                            "{} n={n}: {want} vs {got}",
                            ty.name()
                        );
                    }
                }
                let g = values(n * rows, 5);
                let gx = w.matmul_transposed(&g, n);
                for i in 0..n {
                    for k in (0..cols).step_by(37) {
                        let want: f32 = (0..rows)
                            .map(|r| g[i * rows + r] * dense[r * cols + k])
                            .sum();
                        assert!((want - gx[i * cols + k]).abs() < 1e-3 * (1.0 + want.abs()));
                    }
                }
            }
        }
    }

    #[test]
    fn team_matvec_agrees_with_dequantized_product() {
        // 4-row kernels, single-row tails, and rows of several matrices in one pass.
        let team = crate::team::Team::new(2);
        let cols = 96;
        for ty in [
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::F32,
        ] {
            let a =
                QMatrix::new(ty, 13, cols, quantize(ty, &values(13 * cols, 1)).unwrap()).unwrap();
            let b = QMatrix::new(ty, 6, cols, quantize(ty, &values(6 * cols, 2)).unwrap()).unwrap();
            let x = values(cols, 9);
            let outs = matvec_team(&team, &[&a, &b], &x);
            for (m, y) in [&a, &b].into_iter().zip(&outs) {
                let dense = m.dequantize();
                for r in 0..m.rows {
                    let want: f32 = (0..cols).map(|k| x[k] * dense[r * cols + k]).sum();
                    assert!(
                        (want - y[r]).abs() < 1e-4 * (1.0 + want.abs()),
                        "{} row {r}",
                        ty.name()
                    );
                }
            }
        }
    }
}
