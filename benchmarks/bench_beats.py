"""BEATs encoder speed and memory: Flax (jit, warm) vs speechbrain 1.1.2 (PyTorch), same CPU.

    python benchmarks/bench_beats.py [--seconds 10] [--repeats 5] [--batch 1]

Each side runs in its own subprocess so peak RSS (VmHWM) is its own; the figure reported
is peak RSS minus the RSS after imports. Released configuration (12 x 768), random weights,
waveform in (fbank included on both sides), `--batch` clips per call (times are per call and
per clip). Also: Flax compile time, and a check that a second clip length in the same length
bucket reuses the compiled code. Prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from process_memory import peak_mb, rss_mb

REPO = Path(__file__).resolve().parents[1]
SR = 16000


def run_flax(seconds: float, repeats: int, batch: int = 1) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(REPO))
    from haaqi_jax.beats import RELEASED_CONFIG, BEATs, BEATsConfig, init_params
    from haaqi_jax.data.buckets import pad_to_bucket

    base = rss_mb()
    cfg = BEATsConfig.from_dict(RELEASED_CONFIG)
    params = init_params(cfg, jax.random.key(0))
    model = BEATs(cfg)
    forward = jax.jit(lambda p, w, m: model.apply({"params": p}, w, m).last_hidden_state)
    rng = np.random.default_rng(0)
    clips = (0.1 * rng.normal(size=(batch, int(seconds * SR)))).astype(np.float32)
    clip = clips[0]
    wav = jnp.asarray(clips)
    no_pad = jnp.zeros(wav.shape, bool)

    start = time.perf_counter()
    compiled = forward.lower(params, wav, no_pad).compile()
    compile_s = time.perf_counter() - start
    compiled(params, wav, no_pad).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compiled(params, wav, no_pad).block_until_ready()
        times.append(time.perf_counter() - start)

    # Two clip lengths in one bucket: one compilation.
    first, mask1 = pad_to_bucket([clip])
    second, mask2 = pad_to_bucket([clip[: int(0.97 * clip.size)]])
    assert first.shape == second.shape, (first.shape, second.shape)
    forward(params, jnp.asarray(first), jnp.asarray(mask1)).block_until_ready()
    size_after_first = forward._cache_size()
    forward(params, jnp.asarray(second), jnp.asarray(mask2)).block_until_ready()
    recompiled = forward._cache_size() != size_after_first
    return {"median_s": statistics.median(times), "min_s": min(times), "compile_s": compile_s,
            "peak_rss_delta_mb": peak_mb() - base, "bucket_len": int(first.shape[1]),
            "second_length_recompiled": bool(recompiled), "devices": str(jax.devices())}


def run_torch(seconds: float, repeats: int, threads: int = 0, batch: int = 1) -> dict:
    import tempfile

    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)

    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # noqa: F401  (bare torchaudio package so speechbrain imports)
    import beats_reference as ref

    base = rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        path = ref.save_official_checkpoint(Path(tmp) / "released.pt", ref.RELEASED_CFG,
                                            ref.make_beats_state_dict(ref.RELEASED_CFG, 0))
        model = ref.speechbrain_beats(path)
    model.output_all_hiddens = False
    rng = np.random.default_rng(0)
    wav = torch.from_numpy((0.1 * rng.normal(size=(batch, int(seconds * SR)))).astype(np.float32))
    lens = torch.ones(batch)
    with torch.no_grad():
        model(wav, lens)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(wav, lens)
            times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times),
            "peak_rss_delta_mb": peak_mb() - base, "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1, help="clips per call (default 1)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="also time torch with this many threads (0: only its default); "
                             "on a loaded machine OpenMP's default can oversubscribe")
    parser.add_argument("--side", choices=["flax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = (run_flax(args.seconds, args.repeats, args.batch) if args.side == "flax" else
                  run_torch(args.seconds, args.repeats, args.threads, args.batch))
        print(json.dumps(result))
        return 0
    results = {}
    runs = [("torch", 0), ("flax", 0)] + ([("torch", args.torch_threads)]
                                          if args.torch_threads else [])
    for side, threads in runs:
        proc = subprocess.run([sys.executable, __file__, "--side", side, "--seconds",
                               str(args.seconds), "--repeats", str(args.repeats),
                               "--threads", str(threads), "--batch", str(args.batch)],
                              capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        results[(side, threads)] = json.loads(proc.stdout.strip().splitlines()[-1])
    f, t = results[("flax", 0)], results[("torch", 0)]
    b = args.batch
    print(f"BEATs released config, {args.seconds:g} s clips, batch {b}, {os.cpu_count()} CPUs "
          f"(torch threads: {t['threads']}; jax: {f['devices']})")
    ms = {side: r["median_s"] * 1e3 for side, r in (("torch", t), ("flax", f))}
    print(f"  speechbrain (torch): median {ms['torch']:8.1f} ms ({ms['torch'] / b:.1f} per clip)"
          f"   peak RSS +{t['peak_rss_delta_mb']:.0f} MB")
    print(f"  haaqi_jax (flax):    median {ms['flax']:8.1f} ms ({ms['flax'] / b:.1f} per clip)"
          f"   peak RSS +{f['peak_rss_delta_mb']:.0f} MB   compile {f['compile_s']:.1f} s")
    print(f"  bucket {f['bucket_len']} samples: second length recompiled: "
          f"{f['second_length_recompiled']}")
    print(f"  time ratio flax / torch = {f['median_s'] / t['median_s']:.2f}x (target <= 1.0x)")
    if args.torch_threads:
        t2 = results[("torch", args.torch_threads)]
        print(f"  speechbrain with {t2['threads']} thread(s): median {t2['median_s'] * 1e3:.1f} ms"
              f"   ratio flax / torch = {f['median_s'] / t2['median_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
