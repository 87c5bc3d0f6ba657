"""Whole songs through HAAQI-Net: time and peak memory for one long clip, by length.

    python benchmarks/bench_long_clip.py [--seconds 30 60 120 240] [--repeats 2]
                                         [--short-path-max 120] [--torch-max 60]

A released-size HAAQI-Net (BEATs_iter3+ 12 x 768 + the head, random weights) scores one clip
of each length at 16 kHz with `HAAQINet.apply` (jit, batch 1). Attention logits grow with the
square of the length (12 x T^2 floats per BEATs layer, 16 x T^2 in the head, T ~ 49.6 tokens
per second), so past ~82 s (the head) and ~95 s (BEATs) `haaqi_jax.attention` walks the
queries in blocks and BEATs passes its position bias as diagonals
(`attention.default_query_block`). Each row runs in a fresh
subprocess (its own peak RSS, VmHWM):
  blocked   the library as it is;
  one-step  the same with the long-input path switched off (every item's logits at once, the
            position bias as a (12, T, T) table), up to --short-path-max seconds;
  torch     speechbrain 1.1.2 BEATs + the torch head of tests/haaqinet_reference.py (needs
            the test extras), up to --torch-max seconds.
Times: the first call (compilation included) and the best of --repeats warm calls.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from process_memory import peak_mb

REPO = Path(__file__).resolve().parents[1]
SR = 16000
AUDIOGRAM = [10.0, 15.0, 20.0, 30.0, 40.0, 45.0, 50.0, 55.0]


def _clip(seconds: float):
    import numpy as np
    return (0.1 * np.random.default_rng(0).normal(size=int(seconds * SR))).astype(np.float32)


def run_jax(seconds: float, repeats: int, blocked: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from haaqi_jax import attention
    from haaqi_jax.beats import RELEASED_CONFIG
    from haaqi_jax.host_memory import keep_freed_memory
    from haaqi_jax.model import HAAQINet, HAAQINetConfig

    keep_freed_memory()
    if not blocked:
        attention.LONG_ITEM_BYTES = float("inf")
    net = HAAQINet.init_random(HAAQINetConfig(encoder_config=dict(RELEASED_CONFIG)), seed=0)
    wav = jnp.asarray(_clip(seconds)[None])
    hl = jnp.asarray([AUDIOGRAM], jnp.float32)
    start = time.perf_counter()
    score = float(net.apply(wav, None, hl).clip_score[0])
    first = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(net.apply(wav, None, hl).clip_score)
        warm.append(time.perf_counter() - start)
    return {"first_s": first, "warm_s": min(warm), "peak_mb": peak_mb(), "score": score}


def run_torch(seconds: float, repeats: int) -> dict:
    import tempfile

    import torch

    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # noqa: F401  (bare torchaudio package so that speechbrain imports)
    import beats_reference as beats_ref
    import haaqinet_reference as head_ref

    with tempfile.TemporaryDirectory() as tmp:
        path = beats_ref.save_official_checkpoint(
            Path(tmp) / "released.pt", beats_ref.RELEASED_CFG,
            beats_ref.make_beats_state_dict(beats_ref.RELEASED_CFG, 0))
        beats = beats_ref.speechbrain_beats(path)
    beats.output_all_hiddens = False
    head = head_ref.make_head(0)
    wav = torch.from_numpy(_clip(seconds)[None])
    hl = torch.tensor([AUDIOGRAM], dtype=torch.float32)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            head(beats(wav, torch.ones(1))[0], hl)
            times.append(time.perf_counter() - start)
    return {"first_s": times[0], "warm_s": min(times[1:]), "peak_mb": peak_mb()}


def _in_subprocess(kind: str, seconds: float, repeats: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--side", kind, "--seconds", str(seconds),
                           "--repeats", str(repeats)], capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"error": f"exit {proc.returncode} ({tail[:120]})"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, nargs="+", default=[30, 60, 120, 240])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--short-path-max", type=float, default=120,
                        help="longest clip run with the long-input path off (memory)")
    parser.add_argument("--torch-max", type=float, default=60,
                        help="longest clip run through the torch reference (0: none)")
    parser.add_argument("--side", choices=["blocked", "one-step", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        seconds = args.seconds[0]
        result = (run_torch(seconds, args.repeats) if args.side == "torch"
                  else run_jax(seconds, args.repeats, blocked=args.side == "blocked"))
        print(json.dumps(result))
        return 0

    from haaqi_jax.model import tokens_for_samples

    print(f"one clip at {SR} Hz, released-size HAAQI-Net, batch 1; first call (with "
          f"compilation) / best of {args.repeats} warm calls / peak RSS of the process")
    print(f"{'seconds':>8} {'tokens':>7}  {'path':<9} {'first s':>8} {'warm s':>8} "
          f"{'peak GB':>8}  score")
    for seconds in args.seconds:
        kinds = ["blocked"]
        if seconds <= args.short_path_max:
            kinds.append("one-step")
        if seconds <= args.torch_max:
            kinds.append("torch")
        for kind in kinds:
            r = _in_subprocess(kind, seconds, args.repeats)
            tokens = tokens_for_samples(int(seconds * SR))
            if "error" in r:
                print(f"{seconds:8.0f} {tokens:7d}  {kind:<9} {r['error']}")
                continue
            score = f"{r['score']:.6f}" if "score" in r else ""
            print(f"{seconds:8.0f} {tokens:7d}  {kind:<9} {r['first_s']:8.2f} {r['warm_s']:8.2f} "
                  f"{r['peak_mb'] / 1024:8.2f}  {score}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
