"""Single-precision matrix-multiply throughput of this machine, as numpy's BLAS reaches it.

Usage:
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benches/sgemm_peak.py [--threads 2]

Times C = A @ B for float32 A, B of 2048 x 2048 (2 * 2048^3 flops) five times after one
warm-up and prints one JSON object: {"sgemm_gflops": median, ...}, with the BLAS library,
its kernel ("architecture", from threadpoolctl when it is installed) and the thread count.
This is the ceiling the other benches are compared against.

OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE override OpenBLAS's choice of kernel; unset them for
the run (as above) to measure what the library picks for this CPU. The script reports them
when they are set.
"""

import argparse
import json
import os
import statistics
import sys
import time

N = 2048
REPEATS = 5


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.threads <= 0:
        print(f"error: --threads must be positive, found {args.threads}", file=sys.stderr)
        sys.exit(2)

    # Thread counts must be in the environment before numpy loads its BLAS.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)
    import numpy as np

    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        threadpool_info = threadpool_limits = None

    rng = np.random.default_rng(0)
    a = rng.standard_normal((N, N), dtype=np.float32)
    b = rng.standard_normal((N, N), dtype=np.float32)
    c = np.empty((N, N), dtype=np.float32)

    def run():
        seconds = []
        np.matmul(a, b, out=c)  # warm-up
        for _ in range(REPEATS):
            started = time.perf_counter()
            np.matmul(a, b, out=c)
            seconds.append(time.perf_counter() - started)
        return seconds

    if threadpool_limits is not None:
        with threadpool_limits(limits=args.threads, user_api="blas"):
            seconds = run()
            blas = [
                {k: info.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                for info in threadpool_info()
                if info.get("user_api") == "blas"
            ]
    else:
        seconds = run()
        blas = "threadpoolctl not installed"

    median = statistics.median(seconds)
    result = {
        "sgemm_gflops": 2 * N**3 / median / 1e9,
        "n": N,
        "repeats": REPEATS,
        "seconds": seconds,
        "threads": args.threads,
        "numpy_version": np.__version__,
        "blas": blas,
        "openblas_overrides": {
            name: os.environ[name]
            for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
            if name in os.environ
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
