"""Forward time of the compute dtypes (`model.dtype`): a released-size BEATs (12 x 768) and a
whole HAAQI-Net (that BEATs + the released head), float32 vs bfloat16, random weights.

    python benchmarks/bench_dtype.py [--seconds 10] [--batch 1] [--repeats 5]
        [--parts beats haaqinet gradient]

Parts: "beats" the encoder's forward, "haaqinet" the whole model's, "gradient" one training
step's work with the encoder trained (the loss, mean squared error of the clip scores to fixed
labels, and its gradient for every parameter; no optimizer update).

Jitted and warm; each dtype is compiled once, then the two are timed in alternating rounds so
that a slower spell of the machine hits both alike. Prints min and median per call and the
bfloat16 / float32 ratio, and the largest clip-score difference between the two. On a CPU
bfloat16 is not expected to be faster (XLA:CPU has few native bf16 kernels); the option is
meant for TPUs and GPUs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SR = 16000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--parts", nargs="+", default=["beats", "haaqinet"],
                        choices=["beats", "haaqinet", "gradient"])
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(REPO))
    from haaqi_jax.model import HAAQINet, HAAQINetConfig, HAAQINetModel, compute_dtype

    config = HAAQINetConfig()                                  # released BEATs + head
    params = HAAQINet.init_random(config, seed=0).params
    rng = np.random.default_rng(0)
    wav = jnp.asarray((0.1 * rng.normal(size=(args.batch, int(args.seconds * SR))))
                      .astype(np.float32))
    levels = jnp.asarray(rng.uniform(0, 60, (args.batch, 8)).astype(np.float32))
    labels = jnp.asarray(rng.uniform(0, 1, args.batch).astype(np.float32))

    def compiled(dtype: str, part: str):
        module = HAAQINetModel(config, compute_dtype(dtype))
        if part == "beats":
            fn = lambda p, w: module.apply({"params": p}, w, None, method="encode")[0]
        elif part == "haaqinet":
            fn = lambda p, w: module.apply({"params": p}, w, None, levels).clip_score
        else:
            def fn(p, w):                   # -> (loss, gradient norm): all gradients computed
                def loss(q):
                    scores = module.apply({"params": q}, w, None, levels).clip_score
                    return jnp.mean((scores - labels) ** 2)
                value, grads = jax.value_and_grad(loss)(p)
                norm = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2)
                                    for g in jax.tree_util.tree_leaves(grads)))
                return jnp.stack([value, norm])
        start = time.perf_counter()
        out = jax.jit(fn).lower(params, wav).compile()
        return out, time.perf_counter() - start

    for part in args.parts:
        runs = {dtype: compiled(dtype, part) for dtype in ("float32", "bfloat16")}
        outputs = {dtype: np.asarray(fn(params, wav).astype(jnp.float32))
                   for dtype, (fn, _) in runs.items()}
        times = {dtype: [] for dtype in runs}
        for _ in range(args.repeats):
            for dtype, (fn, _) in runs.items():
                start = time.perf_counter()
                fn(params, wav).block_until_ready()
                times[dtype].append(time.perf_counter() - start)
        for dtype, values in times.items():
            print(f"{part:8s} {dtype:8s} batch {args.batch} x {args.seconds:g} s on "
                  f"{jax.default_backend()}: min {1e3 * min(values):.2f} ms, median "
                  f"{1e3 * statistics.median(values):.2f} ms per call (compile "
                  f"{runs[dtype][1]:.1f} s)")
        ratio = min(times["bfloat16"]) / min(times["float32"])
        diff = np.abs(outputs["bfloat16"] - outputs["float32"])
        scale = np.abs(outputs["float32"]).max()
        print(f"{part:8s} bfloat16 / float32 time (min): {ratio:.2f}; largest output "
              f"difference {diff.max():.3g} (largest float32 value {scale:.3g})")


if __name__ == "__main__":
    main()
