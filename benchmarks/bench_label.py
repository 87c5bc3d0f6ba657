"""Labelling throughput: `haaqi-jax label` on a manifest of wav pairs vs pyclarity's haaqi_v1.

    python benchmarks/bench_label.py [--rows 32] [--seconds 10] [--rate 44100]
        [--batch-size B] [--no-reference]

Writes --rows reference/processed pairs (bench_haaqi.py's music-like clips, float wav) and a
JSONL manifest to a temporary folder and labels it in this process with `label_manifest` (what
`haaqi-jax label` runs) in two calls: `--limit` one batch first (compilation included, as a
user meets it), then the rest, which the resumable labeller finds still to do (warm). Prints
rows/s of both and, unless --no-reference, pyclarity's time per clip (one clip, in its own
process) and the speed-ups.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_haaqi import AUDIOGRAM, music_batch  # noqa: E402


def write_manifest(folder: Path, rows: int, seconds: float, rate: int) -> Path:
    import soundfile as sf
    ref, proc = music_batch(rows, seconds, rate)
    (folder / "wav").mkdir()
    manifest = folder / "pairs.jsonl"
    with manifest.open("w") as f:
        for i in range(rows):
            sf.write(folder / "wav" / f"ref{i}.wav", ref[i], rate, subtype="FLOAT")
            sf.write(folder / "wav" / f"proc{i}.wav", proc[i], rate, subtype="FLOAT")
            f.write(json.dumps({"id": f"pair{i}", "reference": f"wav/ref{i}.wav",
                                "processed": f"wav/proc{i}.wav", "audiogram": AUDIOGRAM}) + "\n")
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=44100)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="items per metric call (default: the labeller's, 8 on CPU, 64 "
                             "per accelerator)")
    parser.add_argument("--no-reference", action="store_true", help="skip pyclarity")
    args = parser.parse_args(argv)

    from haaqi_jax import host_memory
    host_memory.keep_freed_memory()  # as `haaqi-jax label` does
    import jax
    from haaqi_jax.haaqi.label import default_batch_size, label_manifest

    if args.batch_size is None:
        args.batch_size = default_batch_size(jax.local_devices())

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = write_manifest(folder, args.rows, args.seconds, args.rate)
        out = folder / "labels.jsonl"
        start = time.perf_counter()
        first = label_manifest(manifest, out, batch_size=args.batch_size, progress=False,
                               limit=min(args.batch_size, args.rows))
        cold = time.perf_counter() - start
        start = time.perf_counter()
        rest = label_manifest(manifest, out, batch_size=args.batch_size, progress=False)
        warm = time.perf_counter() - start
        labels = [json.loads(line) for line in out.read_text().splitlines()]
    total = cold + warm
    print(f"{args.rows} rows of {args.seconds:g} s at {args.rate} Hz, batch {args.batch_size}, "
          f"{jax.devices()[0].platform}: {first.n_ok + rest.n_ok} labelled, "
          f"{first.n_failed + rest.n_failed} failed")
    print(f"first batch ({first.n_ok + first.n_failed} rows, with compilation) {cold:.1f} s; "
          f"the other {rest.n_ok + rest.n_failed} rows {warm:.1f} s = "
          f"{(rest.n_ok + rest.n_failed) / max(warm, 1e-9):.2f} rows/s warm; all "
          f"{args.rows / total:.2f} rows/s")
    print(f"first labels: {[round(row['haaqi'], 6) for row in labels[:4]]}")
    per_row_warm = warm / max(rest.n_ok + rest.n_failed, 1)
    if not args.no_reference:
        done = subprocess.run([sys.executable, str(HERE / "bench_haaqi.py"), "--worker",
                               "pyclarity", "--seconds", str(args.seconds), "--rate",
                               str(args.rate), "--reference-clips", "1"],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"pyclarity worker failed:\n{done.stderr[-3000:]}")
        ref = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"pyclarity haaqi_v1: {ref['per_clip_s']:.2f} s per clip; labelling is "
              f"{ref['per_clip_s'] / per_row_warm:.1f}x faster per row warm, "
              f"{ref['per_clip_s'] * args.rows / total:.1f}x with compilation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
