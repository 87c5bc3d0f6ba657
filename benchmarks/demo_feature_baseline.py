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
--reference-estimates asks how much of that an *estimate* of the reference could give: trees
(mean of two seeds) on the processed statistics plus processed minus (a) the true reference's
band means only, (b) a ridge or (c) an MLP estimate of the reference's statistics from the
processed clip's (fitted on the train split), (d) the mean spectrum's part outside the top
principal components of the train split's references (docs/demo_experiments.md has the table).
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


def _standardised(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Each column minus the train rows' mean, over their spread."""
    return (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)


def _ridge(z: np.ndarray, target: np.ndarray, train: np.ndarray, penalty: float) -> np.ndarray:
    """Ridge regression of `target` (n,) or (n, k) on standardised `z`, fitted on the train
    rows (the target centred there), predicted for every row."""
    a, mean = z[train], target[train].mean(0)
    w = np.linalg.solve(a.T @ a + penalty * np.eye(a.shape[1]), a.T @ (target[train] - mean))
    return z @ w + mean


def _trees(x: np.ndarray, labels: np.ndarray, train: np.ndarray, seeds=(0, 1)) -> np.ndarray:
    """Mean prediction of gradient-boosted trees of `seeds`, fitted on the train rows."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    z = _standardised(x, train)
    return np.mean([HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05,
                                                  random_state=seed)
                    .fit(z[train], labels[train]).predict(z) for seed in seeds], axis=0)


def reference_estimates(features: np.ndarray, reference: np.ndarray, n_stats: int,
                        labels: np.ndarray, splits: np.ndarray) -> None:
    """Prints the trees' scores with processed minus each estimate of the reference's
    statistics beside the processed features (`--reference-estimates`)."""
    from sklearn.decomposition import PCA
    from sklearn.neural_network import MLPRegressor

    train = splits == "train"
    bands = n_stats // 3                                 # mean, spread, change per band
    processed = features[:, :n_stats]
    z = _standardised(features, train)

    def with_difference(name: str, estimate: np.ndarray) -> None:
        width = estimate.shape[1]
        extra = processed[:, :width] - estimate
        report(name, _trees(np.concatenate([features, extra], 1), labels, train), labels,
               splits)

    report("trees alone", _trees(features, labels, train), labels, splits)
    with_difference("true ref means", reference[:, :bands])
    for penalty in (100.0, 1000.0):
        with_difference(f"ridge {penalty:g} est", _ridge(z, reference, train, penalty))
    pca = PCA(24).fit(reference[train])
    for hidden in ((256,), (512, 256)):
        mlp = MLPRegressor(hidden_layer_sizes=hidden, alpha=1e-2, max_iter=2000,
                           early_stopping=True, random_state=0)
        mlp.fit(z[train], pca.transform(reference[train]))
        with_difference(f"mlp {'+'.join(map(str, hidden))} est",
                        pca.inverse_transform(mlp.predict(z)))
    for k in (4, 8, 16):
        clean = PCA(k).fit(reference[train][:, :bands])
        with_difference(f"outside pca {k}",
                        clean.inverse_transform(clean.transform(processed[:, :bands])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", nargs="?", default="data_cache/demo/manifest.jsonl")
    parser.add_argument("--with-reference", action="store_true",
                        help="also give the models the processed-minus-reference statistics "
                             "(intrusive; an upper yardstick for these summaries)")
    parser.add_argument("--reference-estimates", action="store_true",
                        help="also trees on estimates of the reference's statistics "
                             "(needs scikit-learn)")
    parser.add_argument("--hold-out", default="", metavar="STAGES",
                        help="comma-separated distortion stages whose train/valid rows form "
                        "the split held_out (as data.hold_out)")
    args = parser.parse_args()
    parts = split_rows(read_manifest(args.manifest, require_label=True))
    stages = [s for s in args.hold_out.split(",") if s.strip()]
    if stages:
        parts = hold_out_distortions(parts, stages)
    rows = [(name, row) for name, part in parts.items() for row in part]
    needs_reference = args.with_reference or args.reference_estimates
    if needs_reference:
        missing = [row.id for _, row in rows if row.reference is None]
        if missing:
            parser.error(f"--with-reference / --reference-estimates: {len(missing)} row(s) "
                         f"have no 'reference', e.g. id {missing[0]!r}")
    features = np.stack([clip_features(row.file_path, row.audiogram)
                         for _, row in tqdm(rows, desc="features")])
    labels = np.asarray([row.haaqi_score for _, row in rows])
    splits = np.asarray([name for name, _ in rows])
    train = splits == "train"
    if needs_reference:
        n_stats = features.shape[1] - len(rows[0][1].audiogram)
        reference = np.stack([clip_features(row.reference, row.audiogram)[:n_stats]
                              for _, row in tqdm(rows, desc="reference features")])
        if args.reference_estimates:
            reference_estimates(features, reference, n_stats, labels, splits)
        if args.with_reference:
            features = np.concatenate([features, features[:, :n_stats] - reference], axis=1)
    z = _standardised(features, train)
    for penalty in (10.0, 100.0, 1000.0):
        report(f"ridge {penalty:g}", _ridge(z, labels, train, penalty), labels, splits)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("(scikit-learn not installed: no gradient boosting)")
        return
    report("boosted trees", _trees(features, labels, train, seeds=(0,)), labels, splits)


if __name__ == "__main__":
    main()
