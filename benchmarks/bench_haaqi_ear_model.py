"""Times the HAAQI ear model on one 10 s, 44.1 kHz music-like pair: pyclarity's ear_model vs
our host preparation and our jit-compiled core (float64 and float32, warm), on this machine.

    python benchmarks/bench_haaqi_ear_model.py [--seconds 10] [--repeats 3] \
        [--bands-per-step 8] [--block 32] [--dtypes float64,float32] [--skip-pyclarity]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from haaqi_jax.haaqi import ear_model as em


def music_like(seconds: float, sample_rate: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    notes = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) * (1 + np.sin(2 * np.pi * r * t))
                for f, r in ((110, 0.7), (277, 1.3), (659, 2.1), (1760, 3.4)))
    noise = rng.standard_normal(t.size) * np.sin(2 * np.pi * 0.5 * t) ** 2
    return 0.05 * notes + 0.02 * noise


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-pyclarity", action="store_true")
    parser.add_argument("--bands-per-step", type=int, default=8)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--dtypes", default="float64,float32")
    args = parser.parse_args()
    fs = 44100
    reference = music_like(args.seconds, fs)
    processed = 1.2 * np.roll(reference, 200) + 0.01 * np.random.default_rng(1).standard_normal(
        reference.size)
    loss = np.array([20, 25, 30, 40, 50, 60.0])

    prep = best_of(lambda: em.prepare_pair(reference, fs, processed, fs, loss, 1, 65.0),
                   args.repeats)
    pair = em.prepare_pair(reference, fs, processed, fs, loss, 1, 65.0)
    n = pair.n
    print(f"clip {args.seconds:g} s at {fs} Hz -> n = {n} samples at 24 kHz")
    print(f"host prepare_pair (resample, align, trim, NAL-R): {prep:.3f} s")

    results = {}
    for dtype in args.dtypes.split(","):
        x64 = dtype == "float64"
        with jax.enable_x64(x64):
            dt = jnp.float64 if x64 else jnp.float32
            args_ = (jnp.asarray(pair.reference_24k, dt), jnp.asarray(pair.processed_24k, dt),
                     jnp.asarray(n, jnp.int32), jax.tree.map(lambda v: jnp.asarray(v, dt),
                                                             pair.params),
                     jnp.zeros((32, n), dt), jnp.zeros((32, n), dt), jnp.asarray(65.0, dt))
            core = jax.jit(functools.partial(em.ear_model_core,
                                             bands_per_step=args.bands_per_step,
                                             block=args.block))
            start = time.perf_counter()
            jax.block_until_ready(core(*args_))
            compile_s = time.perf_counter() - start
            run_s = best_of(lambda: jax.block_until_ready(core(*args_)), args.repeats)
            results[dtype] = run_s
            print(f"core {dtype}: first call (compile + run) {compile_s:.2f} s, warm {run_s:.3f} s")

    if not args.skip_pyclarity:
        from clarity.evaluator.haspi import eb
        eb.ear_model(reference[:fs], fs, processed[:fs], fs, loss, 1, 65.0)   # numba warm-up
        ref_s = best_of(lambda: eb.ear_model(reference, fs, processed, fs, loss, 1, 65.0), 1)
        print(f"pyclarity ear_model: {ref_s:.3f} s")
        for dtype, run_s in results.items():
            print(f"speed-up vs pyclarity, {dtype}: core {ref_s / run_s:.1f}x, "
                  f"core + prepare {ref_s / (run_s + prep):.1f}x")


if __name__ == "__main__":
    main()
