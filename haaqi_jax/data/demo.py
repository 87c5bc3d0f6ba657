"""The self-made demo music-quality dataset and the `haaqi-jax demo-data` subcommand.

    haaqi-jax demo-data OUT_DIR [--n 100] [--seed 0] [--seconds 3 5] [--batch-size 8]

Everything is synthesized here, nothing is downloaded: music (`synth`), degradations
(`degrade`) and listeners (`listeners`); labels come from a labeller, by default the project's
batched JAX HAAQI (float32, equalisation 1, level1 by the Cadenza rule: every reference plays
at 65 dB SPL).

Layout of OUT_DIR:
  settings.json                what was asked for (a second call with the same settings returns
                               the manifest at once; other settings rebuild)
  audio/reference/<id>.wav     clean mix, 16-bit PCM at 24 kHz
  audio/processed/<id>.wav     degraded, loudness-matched to its reference
  clips/<id>.json              one clip's metadata (written after its wavs: resume skips it)
  labels.jsonl                 {"id", "haaqi_score", "haaqi_components"} per clip, appended
                               one batch at a time
  manifest.jsonl               one row per clip: id, file_path (= processed), reference,
                               audiogram, haaqi_score, haaqi_components (HAAQI's nonlinear and
                               linear parts), split, distortion, distortion_params,
                               listener_shape, plus style, music (the piece: tempo, key,
                               bars, instruments, ...), seconds, level_dbfs; paths relative
                               to OUT_DIR
  labels.png                   the labels at a glance: per split, and per distortion type
                               (`overview.label_plot`; written just before the manifest)
  .demo.lock                   held while a process builds the folder (a second one waits)

The processed clip is what a hearing aid fitted to the listener would deliver: the degraded
music through the listener's NAL-R gains, scaled to the RMS of the equally aided clean reference
(a hearing aid's output level does not depend on what degraded the music). The reference file
is the unaided clean mix (equalisation 1: HAAQI applies NAL-R to it itself). Level: both files
get one gain that puts the larger peak of the two at 0.98 less a random 0..3 dB; the labels do
not depend on it (level1 = 65 - 20 log10 RMS of the reference), the files' digital level is what
HAAQI-Net hears.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import io
import json
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from haaqi_jax.audiogram import STANDARD_FREQUENCIES, validate_levels
from haaqi_jax.data import degrade as degrade_lib
from haaqi_jax.data import listeners as listeners_lib
from haaqi_jax.data import overview
from haaqi_jax.data import synth
from haaqi_jax.data.manifest import COMPONENT_NAMES, RAW_LABEL_RANGE, label_fields
from haaqi_jax.files import complete_lines, exclusive_lock, read_json, write_atomic
from haaqi_jax.host_cpus import usable_cpu_count

SETTINGS_VERSION = 2  # 2: eleven seen pairs (was three)
DEFAULT_SPLITS = (("train", 0.6), ("valid", 0.1), ("test_seen", 0.1), ("test_unseen", 0.2))
DEFAULT_SECONDS = (3.0, 5.0)
#: Splits whose name starts with this draw from UNSEEN_DISTORTIONS, all others from SEEN.
UNSEEN_PREFIX = "test_unseen"
#: Share of clean clips among the seen distortions (the rest are equally likely).
CLEAN_SHARE = 0.15
#: Random attenuation below the 16-bit peak limit, dB.
HEADROOM_DB = (0.0, 3.0)
PEAK_LIMIT = 0.98

#: labeller(reference (B, N) float32, processed (B, N) float32, sample_rate,
#:          audiogram_levels (B, 8) float32, lengths (B,) int32, *, seeds (B,) uint32)
#:   -> (B,) scores, or a mapping {"combined": (B,), "nonlinear": (B,), "linear": (B,)} (HAAQI's
#:   score and its two parts, stored as haaqi_components). seeds[i] is item i's own seed
#:   (HAAQI's threshold noise), so a clip's label does not depend on which batch it lands in
#:   beyond float32 rounding (the padding to the batch's longest clip moves it by < 1e-6).
Labeller = Callable[..., "np.ndarray | Mapping[str, np.ndarray]"]


def haaqi_labeller(reference, processed, sample_rate, audiogram_levels, lengths, *, seeds):
    """HAAQI combined scores and their nonlinear and linear parts with the project's batched
    JAX HAAQI (float32, equalisation 1): {"combined", "nonlinear", "linear"} of (B,) arrays.

    level1 follows the Cadenza rule, 65 - 20 log10(rms(reference)): every reference is presented
    at 65 dB SPL whatever its digital level. HAAQI-Net hears only the waveform, not the playback
    level, so labels must not depend on how loud a file happens to be written; with a fixed
    level1 of 65, quiet files sank below moderate and severe losses' thresholds and a quarter
    of the labels piled up at HAAQI's floor (0.162).
    """
    import jax
    import jax.numpy as jnp

    from haaqi_jax.haaqi.api import haaqi_batch
    reference = np.asarray(reference, np.float64)
    valid = np.arange(reference.shape[1])[None, :] < np.asarray(lengths)[:, None]
    rms = np.sqrt((np.where(valid, reference, 0.0) ** 2).sum(1) / np.asarray(lengths))
    level1 = 65.0 - 20.0 * np.log10(np.maximum(rms, 1e-8))
    result = haaqi_batch(reference, processed, sample_rate, audiogram_levels,
                         np.asarray(STANDARD_FREQUENCIES), equalisation=1, level1=level1,
                         lengths=lengths, dtype=jnp.float32, progress=False,
                         key=jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds]))
    return {part: np.asarray(getattr(result, part), dtype=np.float64)
            for part in ("combined",) + COMPONENT_NAMES}


# The name keys the cached labels: change it when the labels change. "noise2": the threshold
# noise's uniforms on a 23-bit grid (one sample in 2^24 used to be infinite in float32).
haaqi_labeller.name = "haaqi_jax.haaqi_batch/float32/eq1/level1=cadenza/with-parts/noise2"


def _labeller_name(labeller: Labeller) -> str:
    return str(getattr(labeller, "name", None)
               or f"{getattr(labeller, '__module__', '?')}.{getattr(labeller, '__qualname__', '?')}")


# -------------------------------------------------------------------------------- one clip


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What determines the audio (all but `labeller`) and the labels (all)."""

    n_clips: int
    seed: int
    clip_seconds: tuple[float, float]
    splits: tuple[tuple[str, float], ...]
    sample_rate: int
    labeller: str
    version: int = SETTINGS_VERSION

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["clip_seconds"] = list(self.clip_seconds)
        d["splits"] = [list(s) for s in self.splits]
        return d

    def audio_key(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_json().items() if k != "labeller"}


#: The shortest demo clip, s: the degradations' STFTs and HAAQI's segments need some length.
MIN_CLIP_SECONDS = 0.5
#: The longest, s: twice the longest piece the HAAQI-Net paper scores (30 s); the synthesizer
#: and the labeller hold a whole clip in memory.
MAX_CLIP_SECONDS = 60.0


def _validate(n_clips, seed, clip_seconds, splits, sample_rate):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
    if isinstance(n_clips, bool) or not isinstance(n_clips, (int, np.integer)) or n_clips < 1:
        raise ValueError(f"n_clips must be a whole number >= 1, got {n_clips!r}")
    if len(clip_seconds) != 2 or not (
            MIN_CLIP_SECONDS <= clip_seconds[0] <= clip_seconds[1] <= MAX_CLIP_SECONDS):
        raise ValueError(f"clip_seconds must be (min, max) with {MIN_CLIP_SECONDS} <= min <= "
                         f"max <= {MAX_CLIP_SECONDS}, got {clip_seconds}")
    names = [s[0] for s in splits]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"splits need distinct names, got {names}")
    fractions = np.asarray([s[1] for s in splits], dtype=np.float64)
    if not np.all(np.isfinite(fractions) & (fractions >= 0)) or abs(fractions.sum() - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {list(splits)}")
    if sample_rate < 16000:
        raise ValueError(f"sample_rate must be >= 16 kHz (HAAQI reads up to 8 kHz), "
                         f"got {sample_rate}")


def assign_splits(n_clips: int, splits: Sequence[tuple[str, float]], seed: int) -> list[str]:
    """Split name per clip: counts by largest remainder, order by a seeded permutation."""
    fractions = np.asarray([f for _, f in splits], dtype=np.float64)
    if np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {list(splits)}")
    exact = fractions * n_clips
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n_clips - counts.sum()]:
        counts[i] += 1
    names = np.repeat([name for name, _ in splits], counts)
    perm = np.random.default_rng([seed, 0x5B117]).permutation(n_clips)
    return [str(names[i]) for i in perm]


def _choose_distortion(rng: np.random.Generator, split: str) -> str:
    if split.startswith(UNSEEN_PREFIX):
        pool = degrade_lib.UNSEEN_DISTORTIONS
        return str(pool[int(rng.integers(len(pool)))])
    pool = degrade_lib.SEEN_DISTORTIONS
    others = [d for d in pool if d != "clean"]
    if rng.random() < CLEAN_SHARE:
        return "clean"
    return str(others[int(rng.integers(len(others)))])


def clip_id(index: int) -> str:
    return f"demo{index:06d}"


def make_clip(index: int, split: str, settings: DemoSettings) -> dict[str, Any]:
    """Synthesizes clip `index`: a pure function of (seed, index, split, settings).

    Returns its metadata plus "reference_audio" and "processed_audio" ((N,) float32 arrays).
    """
    rng = np.random.default_rng([settings.seed, index])
    sr = settings.sample_rate
    seconds = round(float(rng.uniform(*settings.clip_seconds)), 2)
    music, info = synth.synthesize_piece(rng, seconds, sample_rate=sr)
    shape, levels = listeners_lib.draw_listener(rng)
    distortion = _choose_distortion(rng, split)
    degraded = degrade_lib.degrade(music, sr, distortion, rng)
    # The listener's hearing aid: NAL-R gain after the degradation, output at the level of
    # the aided clean reference.
    aided_reference = listeners_lib.fit_hearing_aid(music, sr, levels)
    aided = listeners_lib.fit_hearing_aid(degraded.processed, sr, levels)
    aided *= degrade_lib.rms(aided_reference) / max(degrade_lib.rms(aided), 1e-12)
    # As loud as 16 bits allow (HAAQI at level1 = 65 dB SPL hears RMS 1 as 65 dB SPL, so
    # quiet files are inaudible to impaired ears), less a random 0..3 dB.
    peak = max(float(np.max(np.abs(music))), float(np.max(np.abs(aided))))
    gain = PEAK_LIMIT / peak * 10.0 ** (-float(rng.uniform(*HEADROOM_DB)) / 20.0)
    reference = music * gain
    processed = aided * gain
    level_dbfs = 20 * np.log10(degrade_lib.rms(processed))
    cid = clip_id(index)
    return {
        "id": cid,
        "file_path": f"audio/processed/{cid}.wav",
        "reference": f"audio/reference/{cid}.wav",
        "audiogram": [float(v) for v in levels],
        "split": split,
        "distortion": distortion,
        "distortion_params": degraded.params,
        "listener_shape": shape,
        "style": info["style"],
        "music": info,
        "seconds": seconds,
        "level_dbfs": round(level_dbfs, 2),
        "reference_audio": reference.astype(np.float32),
        "processed_audio": processed.astype(np.float32),
    }


# ---------------------------------------------------------------------------------- files


def _write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    buffer = io.BytesIO()
    sf.write(buffer, audio, sample_rate, subtype="PCM_16", format="WAV")
    write_atomic(path, buffer.getvalue())


def _read_labels(path: Path) -> dict[str, dict[str, Any]]:
    """id -> {"haaqi_score", ["haaqi_components"]} of the labels recorded so far. A last line
    cut short by a kill is cut off the file (its clip is labelled again)."""
    labels: dict[str, dict[str, Any]] = {}
    for line in complete_lines(path):
        try:
            row = json.loads(line)
            labels[str(row["id"])] = {"haaqi_score": float(row["haaqi_score"]),
                                      **({"haaqi_components": dict(row["haaqi_components"])}
                                         if row.get("haaqi_components") else {})}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return labels


#: What this module writes into a dataset folder, and nothing else is ever deleted.
_OWN_FILES = ("audio/reference/demo[0-9]*.wav", "audio/processed/demo[0-9]*.wav",
              "clips/demo[0-9]*.json")


def _demo_settings(path: Path) -> dict[str, Any] | None:
    """The settings in a demo folder's settings.json; None when there is none, or when the file
    is not one this module wrote (not JSON, or without the keys every version has written)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ours = {"n_clips", "seed", "clip_seconds", "splits", "sample_rate", "labeller"}
    return old if isinstance(old, dict) and ours <= set(old) else None


def _prepare_dir(out: Path, settings: DemoSettings) -> None:
    """Deletes what the new settings invalidate: only files this module wrote.

    Raises ValueError for a folder that holds other things but no demo dataset (a
    settings.json that this module wrote), so that a mistyped OUT_DIR never loses anybody's
    files. (settings.json is written whole or not at all, so an unreadable one is not ours.)
    """
    path = out / "settings.json"
    old = _demo_settings(path)
    if old is None and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no demo dataset "
                         f"({'its settings.json is not a demo' if path.exists() else 'no'} "
                         f"settings.json); pick a new or empty folder")
    if old is not None and old == settings.to_json():
        return
    if old is None or {k: v for k, v in old.items() if k != "labeller"} != settings.audio_key():
        for pattern in _OWN_FILES:
            for own in out.glob(pattern):
                own.unlink()
    for name in ("labels.jsonl", "manifest.jsonl", overview.PLOT_FILE):
        (out / name).unlink(missing_ok=True)
    write_atomic(path, json.dumps(settings.to_json(), indent=1) + "\n")


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    """JSONL via haaqi_jax.data.manifest (its fields plus extras it ignores)."""
    from haaqi_jax.data.manifest import write_manifest
    write_manifest(path, rows)


# ------------------------------------------------------------------------------- labelling


def _label_plan(metas: list[dict[str, Any]], batch_size: int) -> list[list[int]]:
    """Fixed batches: clips ordered by (length, index) then chunked; independent of resume."""
    order = sorted(range(len(metas)), key=lambda i: (metas[i]["seconds"], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def clip_seed(seed: int, cid: str) -> int:
    """The labeller's per-clip seed (threshold noise), a function of dataset seed and id."""
    return zlib.crc32(f"{seed}/{cid}".encode())


def _label_batch(out: Path, metas: list[dict[str, Any]], batch: list[int], batch_size: int,
                 labeller: Labeller, settings: DemoSettings) -> list[float]:
    refs, procs = [], []
    for i in batch:
        ref, sr_r = sf.read(out / metas[i]["reference"], dtype="float32")
        proc, sr_p = sf.read(out / metas[i]["file_path"], dtype="float32")
        if sr_r != settings.sample_rate or sr_p != settings.sample_rate or ref.shape != proc.shape:
            raise ValueError(f"{metas[i]['id']}: reference/processed wavs do not match the "
                             f"settings (rates {sr_r}, {sr_p}; shapes {ref.shape}, {proc.shape}):"
                             f" damaged or changed? Delete {out / 'clips' / metas[i]['id']}.json "
                             f"to synthesise the clip again")
        refs.append(ref)
        procs.append(proc)
    # Pad to whole seconds so that a jitted labeller compiles once per length bucket; the
    # batch is filled up with copies of its first clip (their scores are dropped).
    sr = settings.sample_rate
    width = int(np.ceil(max(r.size for r in refs) / sr) * sr)
    slots = list(range(len(batch))) + [0] * (batch_size - len(batch))
    reference = np.zeros((batch_size, width), np.float32)
    processed = np.zeros((batch_size, width), np.float32)
    for s, j in enumerate(slots):
        reference[s, :refs[j].size] = refs[j]
        processed[s, :procs[j].size] = procs[j]
    lengths = np.asarray([refs[j].size for j in slots], np.int32)
    levels = validate_levels(np.stack([metas[batch[j]]["audiogram"] for j in slots]),
                             where=f"demo batch starting {metas[batch[0]]['id']}")
    seeds = np.asarray([clip_seed(settings.seed, metas[batch[j]]["id"]) for j in slots],
                       np.uint32)
    out = labeller(reference, processed, sr, levels, lengths, seeds=seeds)
    parts = out if isinstance(out, Mapping) else {"combined": out}
    if "combined" not in parts:
        raise ValueError(f"labeller returned a mapping without 'combined' (keys: "
                         f"{sorted(parts)}); expected scores or {{'combined', "
                         f"{', '.join(repr(n) for n in COMPONENT_NAMES)}}}")
    values = {}
    for name, part in parts.items():
        part = np.asarray(part, dtype=np.float64).reshape(-1)
        if part.shape != (batch_size,):
            raise ValueError(f"labeller returned {name} of shape {part.shape}, expected "
                             f"({batch_size},)")
        part = part[:len(batch)]
        low, high = RAW_LABEL_RANGE
        bad = np.flatnonzero(~(np.isfinite(part) & (part >= low) & (part <= high)))
        if bad.size:
            raise ValueError(f"labeller gave {name} = {part[bad[0]]} for clip "
                             f"{metas[batch[bad[0]]]['id']}: not finite or outside what HAAQI "
                             f"can give ({RAW_LABEL_RANGE})")
        values[name] = part
    labels = [{"haaqi_score": float(s)} for s in values["combined"]]
    if all(name in values for name in COMPONENT_NAMES):
        for i, label in enumerate(labels):
            label["haaqi_components"] = {name: float(values[name][i]) for name in COMPONENT_NAMES}
    return labels


# ------------------------------------------------------------------------------ the dataset


def build_demo_dataset(out_dir: str | os.PathLike, *, n_clips: int = 100, seed: int = 0,
                       clip_seconds: tuple[float, float] = DEFAULT_SECONDS,
                       splits: Sequence[tuple[str, float]] = DEFAULT_SPLITS,
                       labeller: Labeller | None = None, batch_size: int = 8,
                       sample_rate: int = synth.SAMPLE_RATE, progress: bool = True) -> Path:
    """Writes (or finds) the demo dataset in out_dir and returns its manifest path.

    Deterministic for a seed: clip i is made from numpy's Generator seeded with (seed, i), and
    its label uses its own seed (`clip_seed`), whatever batch it is labelled in. Cached: when
    out_dir/settings.json equals these settings and the manifest exists, nothing is done.
    Resumable: clips already written and labels already recorded are kept.

    Args:
      out_dir: folder (created).
      n_clips: number of reference/processed pairs.
      seed: the dataset seed.
      clip_seconds: (min, max) clip length; each clip's length is uniform in it.
      splits: (name, fraction) pairs summing to 1; names starting "test_unseen" get the
        unseen distortions, the others the seen ones.
      labeller: see `Labeller`; None = haaqi_labeller (the project's JAX HAAQI).
      batch_size: clips per labeller call.
      sample_rate: Hz of the written audio (24 kHz: HAAQI's own rate).
      progress: show tqdm bars.

    Returns:
      Path of out_dir/manifest.jsonl.
    """
    splits = tuple((str(n), float(f)) for n, f in splits)
    clip_seconds = (float(clip_seconds[0]), float(clip_seconds[1]))
    _validate(n_clips, seed, clip_seconds, splits, sample_rate)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labeller = haaqi_labeller if labeller is None else labeller
    settings = DemoSettings(int(n_clips), int(seed), clip_seconds, splits, int(sample_rate),
                            _labeller_name(labeller))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a folder for the demo dataset")
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.jsonl"
    if _demo_settings(out / "settings.json") == settings.to_json() and manifest.exists():
        return manifest                         # made already: no lock (read-only folders)
    # Two runs building one folder (a seed sweep from nothing): the second waits, then finds
    # the dataset made.
    with exclusive_lock(out / LOCK_FILE, "", wait=f"another process is building the demo "
                                                  f"dataset in {out}: waiting for it"):
        return _build(out, settings, splits, labeller, batch_size, progress)


#: The lock file of a demo folder while a process builds it (not a run's ".lock": a demo
#: folder given as a run's workdir must not wait on the run's own lock).
LOCK_FILE = ".demo.lock"


def synthesis_workers() -> int:
    """Threads that synthesise demo clips: one per CPU core this process may use (its
    affinity and any container CPU quota: `host_cpus.usable_cpu_count`), at most 8."""
    return min(8, usable_cpu_count())


def _synthesize(out: Path, index: int, split: str, settings: DemoSettings) -> dict[str, Any]:
    """Clip `index`'s record: read back when a readable one exists, otherwise the clip is made
    and its two wavs and record written (each atomically)."""
    meta_path = out / "clips" / f"{clip_id(index)}.json"
    try:              # a clip record damaged by hand is made again, like a missing one
        return read_json(meta_path)
    except (FileNotFoundError, ValueError):
        pass
    clip = make_clip(index, split, settings)
    _write_wav(out / clip["reference"], clip.pop("reference_audio"), settings.sample_rate)
    _write_wav(out / clip["file_path"], clip.pop("processed_audio"), settings.sample_rate)
    write_atomic(meta_path, json.dumps(clip) + "\n")
    return clip


def _build(out: Path, settings: DemoSettings, splits: tuple[tuple[str, float], ...],
           labeller: Labeller, batch_size: int, progress: bool) -> Path:
    """`build_demo_dataset` in its folder, locked."""
    manifest = out / "manifest.jsonl"
    _prepare_dir(out, settings)
    if manifest.exists():
        return manifest
    for sub in ("audio/reference", "audio/processed", "clips"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for leftover in (out / sub).glob(".demo[0-9]*.tmp"):    # a killed build's, ours alone
            leftover.unlink()

    split_of = assign_splits(settings.n_clips, splits, settings.seed)
    # Clips are independent (each has its own generator), so threads make them side by side:
    # numpy and scipy release the GIL in their long loops.
    with concurrent.futures.ThreadPoolExecutor(synthesis_workers()) as pool:
        made = pool.map(lambda index: _synthesize(out, index, split_of[index], settings),
                        range(settings.n_clips))
        try:
            metas = list(tqdm(made, total=settings.n_clips, desc="synthesizing clips",
                              disable=not progress))
        except BaseException:     # e.g. the bar's stderr closed: stop now, not after every clip
            pool.shutdown(wait=True, cancel_futures=True)
            raise

    labels_path = out / "labels.jsonl"
    labels = _read_labels(labels_path)
    plan = _label_plan(metas, batch_size)
    todo = [[i for i in batch if metas[i]["id"] not in labels] for batch in plan]
    todo = [batch for batch in todo if batch]
    with open(labels_path, "a") as f, tqdm(total=len(metas), desc="labelling (HAAQI)",
                                           disable=not progress) as bar:
        bar.update(len(metas) - sum(len(batch) for batch in todo))
        for batch in todo:
            batch_labels = _label_batch(out, metas, batch, batch_size, labeller, settings)
            for i, label in zip(batch, batch_labels):
                labels[metas[i]["id"]] = label
                f.write(json.dumps({"id": metas[i]["id"], **label}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))

    rows = []
    for meta in metas:
        row = {k: meta[k] for k in ("id", "file_path", "reference", "audiogram")}
        # HAAQI's polynomial (and its nonlinear part) can dip a hair below 0; labels.jsonl
        # keeps the raw values.
        label = labels[meta["id"]]
        row.update(label_fields(label["haaqi_score"], label.get("haaqi_components")))
        row.update({k: v for k, v in meta.items() if k not in row})
        rows.append(row)
    # Before the manifest, which marks the folder complete: a finished folder has its plot.
    overview.label_plot(rows, out / overview.PLOT_FILE, title="demo set")
    _write_manifest(manifest, rows)
    return manifest


# --------------------------------------------------------------------------------- summary


def score_histogram(scores: Sequence[float], bins: int = 10, width: int = 40) -> str:
    """Text histogram of scores over [0, 1]."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return "HAAQI of 0 clips"
    counts, edges = np.histogram(np.clip(scores, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    top = max(int(counts.max()), 1)
    lines = [f"HAAQI of {scores.size} clips: mean {scores.mean():.3f}, median "
             f"{np.median(scores):.3f}, min {scores.min():.3f}, max {scores.max():.3f}"]
    for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
        lines.append(f"  [{lo:.1f}, {hi:.1f}{']' if hi == 1.0 else ')'} {c:5d} "
                     + "#" * int(round(width * c / top)))
    return "\n".join(lines)


def summarize(manifest: str | os.PathLike) -> str:
    """Histogram plus mean score per split, listener shape and distortion, as text."""
    rows = [json.loads(l) for l in Path(manifest).read_text().splitlines() if l.strip()]
    text = [score_histogram([r["haaqi_score"] for r in rows])]
    for key in ("split", "listener_shape", "distortion"):
        if not any(key in r for r in rows):
            continue
        groups: dict[str, list[float]] = {}
        for r in rows:
            groups.setdefault(str(r.get(key, "(none)")), []).append(r["haaqi_score"])
        text.append(f"mean HAAQI by {key}: " + ", ".join(
            f"{k} {np.mean(v):.2f} (n={len(v)})" for k, v in sorted(groups.items())))
    return "\n".join(text)


# ------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from haaqi_jax.cli import positive_int
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the dataset into")
    parser.add_argument("--n", type=positive_int, default=100,
                        help="number of clips (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--seconds", type=float, nargs=2, metavar=("MIN", "MAX"),
                        default=list(DEFAULT_SECONDS),
                        help=f"clip length range in seconds, within {MIN_CLIP_SECONDS}.."
                             f"{MAX_CLIP_SECONDS:g} (default 3 5)")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="clips per HAAQI call (default 8)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    manifest = build_demo_dataset(args.out_dir, n_clips=args.n, seed=args.seed,
                                  clip_seconds=tuple(args.seconds), batch_size=args.batch_size,
                                  progress=not args.no_progress)
    print(summarize(manifest))
    print(f"manifest: {manifest}")
    plot = manifest.parent / overview.PLOT_FILE
    if plot.exists():                   # (a folder made before the plot existed has none)
        print(f"labels plot: {plot}")
    return 0
