"""`haaqi-jax score`: HAAQI of one processed/reference pair of audio files.

    haaqi-jax score REFERENCE PROCESSED --audiogram 10,10,20,30,40,50,60,60
        [--frequencies 250,500,1000,2000,3000,4000,6000,8000] [--equalisation 1|2]
        [--level1 65|cadenza] [--channel mean|0|1|...] [--seed 0] [--json]

Computes pyclarity's haaqi_v1 (float64) with the threshold noise drawn from numpy's global
generator seeded with --seed, so the numbers equal pyclarity's after `np.random.seed(seed)`.
Multichannel files are scored per channel (same audiogram) and averaged unless --channel picks
one. `--level1 cadenza` sets level1 = 65 - 20 log10(rms(reference channel)).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from haaqi_jax.audiogram import STANDARD_FREQUENCIES

FIELDS = ("combined", "nonlinear", "linear", "cephigh", "bmsync5", "d_loud", "d_norm")


def _numbers(text: str) -> list[float]:
    from haaqi_jax.audiogram import parse_numbers
    try:
        return parse_numbers(text, where="expected comma-separated numbers")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _level1(text: str) -> float | str:
    if text == "cadenza":
        return text
    try:
        return float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--level1 must be a number or 'cadenza', got {text!r}"
                                         ) from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", help="clean reference audio file")
    parser.add_argument("processed", help="processed audio file")
    parser.add_argument("--audiogram", type=_numbers, required=True,
                        help="hearing thresholds in dB HL, comma-separated (8 values at "
                             "250..8000 Hz unless --frequencies is given); a first value "
                             "below 0 needs the = form: --audiogram=-10,0,...")
    parser.add_argument("--frequencies", type=_numbers, default=list(STANDARD_FREQUENCIES),
                        help="audiogram frequencies in Hz, comma-separated")
    parser.add_argument("--equalisation", type=int, choices=(1, 2), default=1,
                        help="1: apply NAL-R to the reference (default); 2: already amplified")
    parser.add_argument("--level1", type=_level1, default=65.0,
                        help="dB SPL of a signal with RMS 1, or 'cadenza' (default 65)")
    parser.add_argument("--channel", default="mean",
                        help="channel index to score, or 'mean' (default) to average channels")
    parser.add_argument("--seed", type=_seed, default=0,
                        help="numpy seed for the threshold noise (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _seed(text: str) -> int:
    """argparse type: a seed numpy's global generator takes (0 .. 2**32 - 1)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(
            f"expected a whole number from 0 to {2**32 - 1}, got {text!r}")
    return value


def _read(path: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    from haaqi_jax.data.audio import audio_info
    try:
        audio_info(Path(path))               # libsndfile says "System error" for a missing file
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    try:
        samples, rate = sf.read(path, dtype="float64", always_2d=True)
    except Exception as err:   # soundfile raises several types for missing/corrupt files
        raise ValueError(f"cannot read audio file {path}: {err}") from err
    return samples, int(rate)


def _channels(x: np.ndarray) -> str:
    return f"{x.shape[1]} channel{'s' if x.shape[1] != 1 else ''}"


def score_files(reference_path: str, processed_path: str, levels, frequencies, *,
                equalisation: int = 1, level1: float | str = 65.0, channel: str = "mean",
                seed: int = 0) -> dict[str, float]:
    """Scores of one pair of files (averaged over the chosen channels), and "audible": False
    when a channel's reference was below the listener's threshold (`backend.nothing_audible`:
    HAAQI then scores 0.162 for any processing as quiet)."""
    from haaqi_jax.audiogram import Audiogram
    from haaqi_jax.haaqi.api import haaqi_v1
    from haaqi_jax.haaqi.backend import nothing_audible

    audiogram = Audiogram(levels, frequencies)
    ref, ref_rate = _read(reference_path)
    proc, proc_rate = _read(processed_path)
    if ref.shape[1] != proc.shape[1]:
        raise ValueError(f"{reference_path} has {_channels(ref)} but {processed_path} has "
                         f"{_channels(proc)}")
    ref_seconds, proc_seconds = ref.shape[0] / ref_rate, proc.shape[0] / proc_rate
    if abs(ref_seconds - proc_seconds) > 0.01:
        print(f"warning: {reference_path} lasts {ref_seconds:.3f} s and {processed_path} "
              f"{proc_seconds:.3f} s: HAAQI (as pyclarity) compares only the first "
              f"{min(ref_seconds, proc_seconds):.3f} s of each and ignores the rest",
              file=sys.stderr)
    if channel == "mean":
        channels = range(ref.shape[1])
    else:
        if not channel.isdigit() or int(channel) >= ref.shape[1]:
            raise ValueError(f"--channel must be 'mean' or an index below {ref.shape[1]}, got "
                             f"{channel!r}")
        channels = [int(channel)]
    np.random.seed(seed)
    per_channel = []
    for c in channels:
        lev = level1
        if lev == "cadenza":
            rms = float(np.sqrt(np.mean(ref[:, c] ** 2)))
            if rms == 0:
                raise ValueError(f"{reference_path} channel {c} is silent")
            lev = 65.0 - 20.0 * np.log10(rms)
        try:
            combined, nonlinear, linear, raw = haaqi_v1(ref[:, c], ref_rate, proc[:, c],
                                                        proc_rate, audiogram, equalisation,
                                                        float(lev))
        except ValueError as err:            # the metric's message says reference/processed
            side = "" if ref.shape[1] == 1 else f", channel {c}"
            raise ValueError(f"{reference_path} / {processed_path}{side}: {err}") from None
        per_channel.append([combined, nonlinear, linear, *raw])
    scores = dict(zip(FIELDS, np.mean(per_channel, axis=0).tolist()))
    scores["audible"] = not any(bool(nothing_audible(c[3], c[4])) for c in per_channel)
    return scores


def run(args: argparse.Namespace) -> int:
    # A bad file or setting raises: `haaqi-jax` reports it in one line with exit 2.
    scores = score_files(args.reference, args.processed, args.audiogram, args.frequencies,
                         equalisation=args.equalisation, level1=args.level1,
                         channel=args.channel, seed=args.seed)
    if args.json:
        print(json.dumps(scores))
    else:
        for name in FIELDS:
            print(f"{name:>9s}: {scores[name]:.6f}")
    if not scores["audible"]:
        print("warning: the reference is below the listener's threshold at this level1: HAAQI "
              "scores 0.162 for any processing as quiet; check --level1 and the audiogram",
              file=sys.stderr)
    return 0
