"""How predictable are a demo set's labels from simple clip statistics? A yardstick for HAAQI-Net.

    python benchmarks/demo_feature_baseline.py [data_cache/demo/manifest.jsonl]
        [--hold-out resonance,tilt_up] [--with-reference]

Features per processed clip (no reference): the mean, standard deviation and frame-to-frame
change of each of BEATs' 128 Kaldi log-mel bands, plus the audiogram / 100. Fits a ridge
regression (numpy; standardised features, several penalties) and, when scikit-learn is
installed, gradient-boosted trees, on the train split, and prints LCC / SRCC per split.
--hold-out moves the train and valid rows of those distortion stages to the split "held_out",
as `train.py --set data.hold_out=...` does, so the yardstick can be read next to that split.
--with-reference adds the same statistics of processed minus reference (an intrusive yardstick:
what these summaries can tell when the clean clip is known, which HAAQI-Net never sees).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import soundfile as sf
from scipy.stats import pearsonr, spearmanr
from tqdm.auto import tqdm

from haaqi_jax.data.audio import resample
from haaqi_jax.data.manifest import hold_out_distortions, read_manifest, split_rows
from haaqi_jax.fbank import kaldi_fbank


def clip_features(path: Path, audiogram, bucket: int = 16000) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    wav = resample(audio.mean(axis=1), rate, 16000)
    width = -(-wav.size // bucket) * bucket          # whole seconds: one compile per length
    padded = np.zeros((1, width), np.float32)
    padded[0, :wav.size] = wav
    fbank, valid = kaldi_fbank(jnp.asarray(padded), jnp.asarray([wav.size]))
    fbank = np.asarray(fbank[0])[np.asarray(valid[0])]                 # (F, 128) valid frames
    return np.concatenate([fbank.mean(0), fbank.std(0), np.diff(fbank, axis=0).std(0),
                           np.asarray(audiogram, np.float64) / 100])


def report(name: str, predicted: np.ndarray, labels: np.ndarray, splits: np.ndarray) -> None:
    parts = []
    for split in sorted(set(splits) - {"train"}):
        m = splits == split
        parts.append(f"{split} {pearsonr(predicted[m], labels[m])[0]:.3f} / "
                     f"{spearmanr(predicted[m], labels[m])[0]:.3f}")
    print(f"{name:<14} LCC / SRCC: " + ", ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", nargs="?", default="data_cache/demo/manifest.jsonl")
    parser.add_argument("--with-reference", action="store_true",
                        help="also give the models the processed-minus-reference statistics "
                             "(intrusive; an upper yardstick for these summaries)")
    parser.add_argument("--hold-out", default="", metavar="STAGES",
                        help="comma-separated distortion stages whose train/valid rows form "
                        "the split held_out (as data.hold_out)")
    args = parser.parse_args()
    parts = split_rows(read_manifest(args.manifest, require_label=True))
    stages = [s for s in args.hold_out.split(",") if s.strip()]
    if stages:
        parts = hold_out_distortions(parts, stages)
    rows = [(name, row) for name, part in parts.items() for row in part]
    if args.with_reference:
        missing = [row.id for _, row in rows if row.reference is None]
        if missing:
            parser.error(f"--with-reference: {len(missing)} row(s) have no 'reference', "
                         f"e.g. id {missing[0]!r}")
    features = np.stack([clip_features(row.file_path, row.audiogram)
                         for _, row in tqdm(rows, desc="features")])
    if args.with_reference:
        n_stats = features.shape[1] - len(rows[0][1].audiogram)
        reference = np.stack([clip_features(row.reference, row.audiogram)[:n_stats]
                              for _, row in tqdm(rows, desc="reference features")])
        features = np.concatenate([features, features[:, :n_stats] - reference], axis=1)
    labels = np.asarray([row.haaqi_score for _, row in rows])
    splits = np.asarray([name for name, _ in rows])
    train = splits == "train"
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    z = (features - mean) / std
    for penalty in (10.0, 100.0, 1000.0):
        a = z[train]
        w = np.linalg.solve(a.T @ a + penalty * np.eye(a.shape[1]),
                            a.T @ (labels[train] - labels[train].mean()))
        report(f"ridge {penalty:g}", z @ w + labels[train].mean(), labels, splits)
    try:
        from sklearn.ensemble import HistGradientBoostingRegressor
    except ImportError:
        print("(scikit-learn not installed: no gradient boosting)")
        return
    gbm = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, random_state=0)
    report("boosted trees", gbm.fit(z[train], labels[train]).predict(z), labels, splits)


if __name__ == "__main__":
    main()
