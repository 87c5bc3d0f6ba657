"""HAAQI speed and memory: haaqi_jax.haaqi_batch (float32, warm) vs pyclarity's haaqi_v1.

    python benchmarks/bench_haaqi.py [--seconds 10] [--rate 44100] [--batch 8]
        [--big-batch 64] [--reference-clips 1] [--no-reference]

Each side runs in its own subprocess so that its peak memory (VmHWM) is its own:
  pyclarity   haaqi_v1 on --reference-clips clips, one at a time (seconds per clip)
  jax         haaqi_batch on --batch clips: one call to compile, one warm call timed
  jax-big     haaqi_batch on --big-batch clips (chunked), peak memory
Prints per-clip times (and clips/s), the speed-up ratio and the peak resident memory of each
process. Both sides first call `haaqi_jax.host_memory.keep_freed_memory()`, as the
`haaqi-jax` CLI does. --no-reference skips pyclarity (e.g. on an accelerator machine without
it installed; its CPU figure is then the one recorded in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from pathlib import Path

import numpy as np

from process_memory import peak_mb

# Run from a checkout without installing: the repository root holds the haaqi_jax package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

AUDIOGRAM = [10, 15, 20, 30, 40, 50, 60, 65]


def music_batch(count: int, seconds: float, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Music-like (harmonic, modulated, note changes) references and noisy/low-passed versions."""
    import scipy.signal
    t = np.arange(int(seconds * rate)) / rate
    refs, procs = [], []
    for i in range(count):
        rng = np.random.default_rng(i)
        x = np.zeros_like(t)
        for f0 in rng.uniform(110, 440, 3):
            pitch = f0 * 2 ** (rng.integers(0, 12, size=int(seconds * 4) + 1)[(t * 4).astype(int)]
                               / 12)
            phase = 2 * np.pi * np.cumsum(pitch) / rate
            for h in range(1, 6):
                x += (0.5 / h) * np.sin(h * phase)
        x = 0.05 * (x * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(t.size))
        b, a = scipy.signal.butter(4, 3000 / (rate / 2))
        refs.append(x)
        procs.append(scipy.signal.lfilter(b, a, x) + 0.01 * rng.standard_normal(t.size))
    return np.stack(refs), np.stack(procs)


def worker(args: argparse.Namespace) -> dict:
    from haaqi_jax import host_memory
    host_memory.keep_freed_memory()  # both sides, as `haaqi-jax label` runs
    if args.worker == "pyclarity":
        from clarity.evaluator.haaqi import haaqi_v1
        from clarity.utils.audiogram import Audiogram
        ref, proc = music_batch(args.reference_clips, args.seconds, args.rate)
        audiogram = Audiogram(np.asarray(AUDIOGRAM, float),
                              np.array([250, 500, 1000, 2000, 3000, 4000, 6000, 8000]))
        np.random.seed(0)
        start = time.perf_counter()
        scores = [haaqi_v1(r, args.rate, p, args.rate, audiogram, 1)[0] for r, p in zip(ref, proc)]
        per_clip = (time.perf_counter() - start) / len(ref)
        return dict(per_clip_s=per_clip, peak_mb=peak_mb(), scores=scores)

    import jax
    import jax.numpy as jnp
    from haaqi_jax.haaqi.api import haaqi_batch
    count = args.batch if args.worker == "jax" else args.big_batch
    ref, proc = music_batch(count, args.seconds, args.rate)
    levels = np.tile(AUDIOGRAM, (count, 1)).astype(float)
    start = time.perf_counter()
    first = haaqi_batch(ref, proc, args.rate, levels, dtype=jnp.float32, chunk=args.chunk)
    cold = time.perf_counter() - start
    out = dict(device=str(jax.devices()[0]), cold_s=cold, scores=first.combined.tolist())
    if args.worker == "jax":
        start = time.perf_counter()
        haaqi_batch(ref, proc, args.rate, levels, dtype=jnp.float32, chunk=args.chunk)
        out["per_clip_s"] = (time.perf_counter() - start) / count
    out["peak_mb"] = peak_mb()
    return out


def run_worker(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--seconds", str(args.seconds), "--rate",
           str(args.rate), "--batch", str(args.batch), "--big-batch", str(args.big_batch),
           "--reference-clips", str(args.reference_clips)]
    if args.chunk:
        cmd += ["--chunk", str(args.chunk)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"worker {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=44100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--big-batch", type=int, default=64)
    parser.add_argument("--reference-clips", type=int, default=1)
    parser.add_argument("--no-reference", action="store_true",
                        help="skip pyclarity; time haaqi_batch alone")
    parser.add_argument("--chunk", type=int, default=None, help="haaqi_batch chunk (default auto)")
    parser.add_argument("--worker", choices=("pyclarity", "jax", "jax-big"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    print(f"{args.seconds:g} s clips at {args.rate} Hz; audiogram {AUDIOGRAM}")
    ref = None if args.no_reference else run_worker("pyclarity", args)
    if ref:
        print(f"pyclarity haaqi_v1: {ref['per_clip_s']:.2f} s per clip, peak "
              f"{ref['peak_mb']:.0f} MB")
    jax_run = run_worker("jax", args)
    print(f"haaqi_batch float32 (batch {args.batch}, {jax_run['device']}): "
          f"{jax_run['per_clip_s']:.3f} s per clip warm = {1 / jax_run['per_clip_s']:.2f} clips/s "
          f"(first call {jax_run['cold_s']:.1f} s), peak host RSS {jax_run['peak_mb']:.0f} MB")
    print(f"scores: {np.round(jax_run['scores'], 6).tolist()}")
    if ref:
        print(f"speed-up per clip: {ref['per_clip_s'] / jax_run['per_clip_s']:.1f}x")
        m = min(len(ref["scores"]), len(jax_run["scores"]))
        diff = np.max(np.abs(np.subtract(ref["scores"][:m], jax_run["scores"][:m])))
        print(f"max |HAAQI float32 - pyclarity| on the shared clips: {diff:.2e}")
    if args.big_batch:
        big = run_worker("jax-big", args)
        print(f"haaqi_batch float32 (batch {args.big_batch}, chunked): {big['cold_s']:.1f} s "
              f"including compilation, peak {big['peak_mb']:.0f} MB")


if __name__ == "__main__":
    main()
