//! Function multiversioning for the hand-written loops of the CPU kernels.
//!
//! The crate is compiled for the baseline of its target (SSE2 on x86-64), so a plain loop
//! vectorises four lanes wide. The loops wrapped in [`vectorized!`] are compiled once more per
//! listed instruction set (AVX-512, AVX2 with FMA) and the best one the CPU has is picked at
//! run time, so the same binary runs everywhere and uses wide vectors where they exist.

/// Wraps each function item in `multiversion` with smelt's target list. Helpers called from
/// these functions must be `#[inline(always)]`: a helper left out of line runs its baseline
/// (SSE2) code.
macro_rules! vectorized {
    ($($item:item)*) => {
        $(
            #[multiversion::multiversion(targets(
                "x86_64+avx512f+avx512bw+avx512vl+avx512dq+avx2+fma+f16c",
                "x86_64+avx2+fma+f16c",
            ))]
            $item
        )*
    };
}
