"""`haaqi-jax label`: HAAQI labels for every row of a manifest -- batched, resumable.

    haaqi-jax label MANIFEST --out LABELS.jsonl [--errors ERRORS.jsonl] [--batch-size B]
        [--equalisation 1|2] [--level1 65|cadenza] [--ears average|left|right]
        [--dtype float32|float64] [--seed 0] [--limit N] [--manifest-out TRAIN.jsonl]

MANIFEST is JSONL (one object per line) or CSV (`.csv`, a header row) with the keys
  reference, processed   paths; relative paths resolve against the manifest's folder
  audiogram              8 dB HL values at 250..8000 Hz (the same hearing on both ears), or
  audiogram_left, audiogram_right   one per ear
  audiogram_frequencies  optional, Hz, when the audiogram is not at the 8 standard frequencies
  level1                 optional dB SPL of RMS 1 for this row (beats --level1)
  id                     optional (default: the row's 0-based position among the data rows)
  split, distortion      optional text, copied into the training manifest (--manifest-out)
In CSV, a list is one cell with comma- or space-separated numbers ("0,10,20,..." or "[0, 10, 20,
...]"; quote it) and an empty cell means "not given".

Ears: stereo files give the left channel to the left ear and the right channel to the right ear,
mono files the same signal to both. `--ears average` scores every ear the row describes and
averages the combined scores (a single `audiogram` on a mono pair is one item, ear "both"); `left`
/ `right` score one ear. `--level1 cadenza` sets level1 = 65 - 20 log10(rms(reference channel))
per ear, as the Cadenza recipes do.

Bad rows (malformed line, missing key, invalid audiogram, missing/corrupt file, rates, lengths or
channel counts that differ between reference and processed, NaN/inf samples, empty or silent
reference, a metric error or non-finite score) go to the errors file (default: OUT with
`.errors.jsonl`) with their id, line and reason; the run goes on. Reference and processed must
share a sample rate: resample offline (with the resampler your scores should reflect) rather
than have this tool pick one.

Output rows (JSONL): id, line, reference, processed (as written in the manifest), haaqi (the
combined score, ears averaged), per_ear {ear: {combined, nonlinear, linear, cephigh, bmsync5,
d_loud, d_norm, level1, audible}}, inputs {audiograms: {ear: 8 dB HL at the standard frequencies},
level1: the row's own or null}, sample_rate, and the settings equalisation, level1_rule, ears,
dtype, seed (a rerun into the same OUT must use the same settings).

Training manifest (`--manifest-out TRAIN.jsonl`): after labelling, every row of OUT becomes
training rows in the format `train.py` reads (`haaqi_jax.data.manifest`): one row per scored ear,
with file_path = processed, reference, that ear's audiogram at the 8 standard frequencies, the
ear's combined score as haaqi_score and its nonlinear / linear parts as haaqi_components (each
clipped to [0, 1]), `channel` left / right for a single ear of a file, and split / distortion
copied from the manifest. The two ears of one row get ids `<id>/left`, `<id>/right` and share
`group` <id>, so a random train / valid split keeps them together. HAAQI-Net scores one signal
for one ear, hence one row per ear rather than the ears' average.

Resuming: rows whose id is already in OUT are skipped; rows in the errors file are tried again
(their old entries are replaced), so fixing a file and rerunning labels it. A labelled row whose
manifest entry has changed since (paths, audiograms, ears, its own level1) is labelled again and
its old label removed; the run says how many. A file replaced in place under the same name is not
noticed: delete its row from OUT to relabel it. Each ear's threshold noise key comes from (seed,
row id, ear) only, and the batch plan is made from the whole manifest (sorted by sample rate and
length, then packed), so a rerun pads the same batches to the same shapes and its output equals
an uninterrupted run's. Each batch is appended with flush +
fsync, so a killed run loses at most the batch in flight (a half-written last line is removed).
One run at a time writes an OUT (a lock file `.OUT.lock` beside it; a second run is refused).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from haaqi_jax.audiogram import STANDARD_FREQUENCIES, Audiogram
from haaqi_jax.host_memory import is_out_of_memory

#: Fields of HAAQIResult, each written per ear.
COMPONENTS = ("combined", "nonlinear", "linear", "cephigh", "bmsync5", "d_loud", "d_norm")
EAR_CHOICES = ("average", "left", "right")
DTYPE_CHOICES = ("float32", "float64")
#: Signals whose peak is below this are "silent" (HAAQI's trim and level need a real reference).
SILENCE_PEAK = 1e-8

Scorer = Callable[..., Any]


# ----------------------------------------------------------------------------------------------
# Manifest rows


@dataclasses.dataclass(frozen=True)
class LabelRow:
    """One parsed manifest row.

    Attributes:
      id: the row id as written (or the row position), `key` is its string form.
      line: 1-based line of the row in the manifest file.
      reference, processed: the paths as written; *_path: resolved.
      audiograms: ear name ("both", "left" or "right") -> Audiogram.
      level1: the row's own level1 in dB SPL, or None.
      split, distortion: the row's optional texts (for the training manifest), or None.
    """

    id: Any
    line: int
    reference: str
    processed: str
    reference_path: Path
    processed_path: Path
    audiograms: dict[str, Audiogram]
    level1: float | None
    split: str | None = None
    distortion: str | None = None

    @property
    def key(self) -> str:
        return str(self.id)

    def levels(self, ear: str) -> np.ndarray:
        """(8,) dB HL of `ear` ("both", "left" or "right"; a row's one `audiogram` serves every
        ear) at the standard frequencies. HAAQI reads the loss at 250..6000 Hz, all among them,
        so resampling onto them first (log-frequency, clamped) leaves the metric's audiogram
        unchanged. ValueError when the row has no audiogram for that ear."""
        audiogram = self.audiograms.get(ear, self.audiograms.get("both"))
        if audiogram is None:
            raise ValueError(f"row id {self.id!r} has no audiogram for the {ear} ear")
        return audiogram.resample(STANDARD_FREQUENCIES).levels


@dataclasses.dataclass(frozen=True)
class RowError:
    """Why one row got no label. `stage`: manifest, audio or metric."""

    id: Any
    line: int
    stage: str
    reason: str
    reference: str | None = None
    processed: str | None = None

    @property
    def key(self) -> str:
        return str(self.id)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "line": self.line, "reference": self.reference,
                "processed": self.processed, "stage": self.stage, "reason": self.reason}


def _as_values(value: Any, key: str) -> np.ndarray:
    """A list of numbers from JSON (list) or CSV (a "v1,v2,..." or "v1 v2 ..." cell, brackets
    allowed: "[v1, v2, ...]" as a JSON list reads)."""
    if isinstance(value, str):
        from haaqi_jax.audiogram import parse_numbers
        return np.asarray(parse_numbers(value, where=key), dtype=np.float64)
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{key}: expected a list of numbers, got {value!r}")
    return np.asarray(value, dtype=np.float64)


def _parse_row(fields: dict[str, Any], *, index: int, line: int, root: Path) -> LabelRow:
    """Turns one manifest object into a LabelRow; ValueError names the key at fault."""
    fields = {k: v for k, v in fields.items() if v is not None and v != ""}
    row_id = fields.get("id", index)
    if not isinstance(row_id, (int, str)) or isinstance(row_id, bool):
        raise ValueError(f"id: expected a string or an integer, got {row_id!r}")
    paths = {}
    for key in ("reference", "processed"):
        if key not in fields:
            hint = (" (a training manifest's 'file_path' is the processed file here: name it "
                    "'processed')" if key == "processed" and "file_path" in fields else "")
            raise ValueError(f"missing key {key!r}{hint}")
        if not isinstance(fields[key], str):
            raise ValueError(f"{key}: expected a path string, got {fields[key]!r}")
        paths[key] = fields[key]
    frequencies = (_as_values(fields["audiogram_frequencies"], "audiogram_frequencies")
                   if "audiogram_frequencies" in fields else np.asarray(STANDARD_FREQUENCIES))
    given = [k for k in ("audiogram", "audiogram_left", "audiogram_right") if k in fields]
    if not given:
        raise ValueError("missing key 'audiogram' (or 'audiogram_left' and 'audiogram_right')")
    if "audiogram" in given and len(given) > 1:
        raise ValueError("give either 'audiogram' or 'audiogram_left'/'audiogram_right', not both")
    audiograms = {}
    for key in given:
        levels = _as_values(fields[key], key)
        try:
            audiograms[key.removeprefix("audiogram_").replace("audiogram", "both")] = Audiogram(
                levels, frequencies)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
    level1 = None
    if "level1" in fields:
        if isinstance(fields["level1"], bool):
            raise ValueError(f"level1: expected a number, got {fields['level1']!r}")
        try:
            level1 = float(fields["level1"])
        except (TypeError, ValueError):
            raise ValueError(f"level1: expected a number, got {fields['level1']!r}") from None
        if not math.isfinite(level1):
            raise ValueError(f"level1: not finite ({level1})")
    texts = {}
    for key in ("split", "distortion"):
        if key in fields and not isinstance(fields[key], str):
            raise ValueError(f"{key}: expected a string, got {fields[key]!r}")
        texts[key] = fields.get(key)
    return LabelRow(id=row_id, line=line, reference=paths["reference"],
                    processed=paths["processed"], reference_path=root / paths["reference"],
                    processed_path=root / paths["processed"], audiograms=audiograms,
                    level1=level1, **texts)


def _raw_rows(path: Path) -> Iterable[tuple[int, int, dict[str, Any] | None, str | None]]:
    """(row index, line, fields or None, problem or None) for every data row of the file."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:  # a BOM (Excel) is fine
            reader = csv.DictReader(f)
            for index, record in enumerate(reader):
                extra = record.pop(None, None)  # cells beyond the header
                problem = f"{len(extra)} more cells than the header has" if extra else None
                fields = {k.strip(): (v.strip() if isinstance(v, str) else v)
                          for k, v in record.items() if k}
                row_id = fields.get("id")
                if row_id and row_id.lstrip("-").isdigit() and str(int(row_id)) == row_id:
                    fields["id"] = int(row_id)  # "7" as JSONL's 7; "007" stays text
                yield index, reader.line_num, fields, problem
        return
    with open(path, encoding="utf-8-sig") as f:
        index = 0
        for line_number, text in enumerate(f, start=1):
            if not text.strip() or text.lstrip().startswith("#"):
                continue                    # blank and comment lines, as read_manifest
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as err:
                yield index, line_number, None, f"malformed JSON: {err.msg} (column {err.colno})"
            else:
                if isinstance(fields, dict):
                    yield index, line_number, fields, None
                else:
                    kind = type(fields).__name__
                    yield index, line_number, None, f"expected a JSON object, got {kind}"
            index += 1


def read_label_manifest(path: str | os.PathLike, *, limit: int | None = None,
                        ) -> tuple[list[LabelRow], list[RowError]]:
    """Parses a label manifest (JSONL, or CSV by the `.csv` suffix; format: module docstring).

    Returns the good rows and a RowError per bad one (malformed line, missing key, bad audiogram or
    level1, duplicate id), in file order. `limit` keeps only the first `limit` data rows.
    Raises FileNotFoundError if the manifest itself is missing, ValueError if it is a folder,
    not UTF-8 text or holds no rows.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"manifest {path} is a folder; give the manifest file (JSONL or CSV)")
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    try:
        raw = list(_raw_rows(path))
    except UnicodeDecodeError as err:
        raise ValueError(f"manifest {path} is not UTF-8 text (byte {err.start}); save it as "
                         f"UTF-8") from None
    if not raw:
        raise ValueError(f"manifest {path} has no rows" + (
            " below its header" if path.suffix.lower() == ".csv" else "")
            + ": nothing to label (one JSON object per line, or a CSV with a header row)")
    rows, errors, seen = [], [], set()
    for index, line, fields, problem in raw:
        if limit is not None and index >= limit:
            break
        row_id = fields.get("id", index) if fields else index
        ref = fields.get("reference") if fields else None
        proc = fields.get("processed") if fields else None
        if problem is None:
            try:
                row = _parse_row(fields, index=index, line=line, root=path.parent)
            except ValueError as err:
                problem = str(err)
            else:
                if row.key in seen:
                    problem = f"duplicate id {row.id!r}"
        if problem is not None:
            errors.append(RowError(row_id if isinstance(row_id, (int, str)) else index, line,
                                   "manifest", f"{path}, line {line}: {problem}",
                                   ref if isinstance(ref, str) else None,
                                   proc if isinstance(proc, str) else None))
            seen.add(str(row_id))
            continue
        seen.add(row.key)
        rows.append(row)
    return rows, errors


# ----------------------------------------------------------------------------------------------
# Audio: header probe (planning) and reading (per batch)


@dataclasses.dataclass(frozen=True)
class _Probe:
    sample_rate: int
    frames: int
    reference_channels: int
    processed_channels: int


def _probe(row: LabelRow) -> _Probe:
    """Header-level checks of both files; ValueError names the file and the problem."""
    from haaqi_jax.data.audio import audio_info
    infos = {}
    for what, path in (("reference", row.reference_path), ("processed", row.processed_path)):
        try:
            info = audio_info(path)
        except FileNotFoundError as err:                     # missing, or a folder
            raise ValueError(f"{what}: {err}") from None
        except ValueError as err:
            raise ValueError(f"cannot read {what} file {err}") from None
        if info.frames <= 0:
            raise ValueError(f"{what} file {path} is empty")
        if info.channels not in (1, 2):
            raise ValueError(f"{what} file {path} has {info.channels} channels; expected 1 or 2")
        infos[what] = info
    ref, proc = infos["reference"], infos["processed"]
    if ref.samplerate != proc.samplerate:
        raise ValueError(f"sample rates differ: reference {ref.samplerate} Hz, processed "
                         f"{proc.samplerate} Hz (resample one of them first)")
    from haaqi_jax.haaqi.ear_model import MIN_SAMPLE_RATE
    if ref.samplerate < MIN_SAMPLE_RATE:   # HAAQI refuses it; the batch's rate would abort all
        raise ValueError(f"reference file {row.reference_path} is at {ref.samplerate} Hz; HAAQI "
                         f"needs at least {MIN_SAMPLE_RATE:g} Hz")
    if ref.frames != proc.frames:
        raise ValueError(f"lengths differ: reference {ref.frames} samples, processed "
                         f"{proc.frames} samples")
    if ref.channels != proc.channels:  # as `haaqi-jax score`: which ear hears what is unclear
        raise ValueError(f"channels differ: reference {ref.channels}, processed {proc.channels} "
                         f"(give a mono pair, or a stereo pair for the two ears)")
    return _Probe(int(ref.samplerate), int(ref.frames), int(ref.channels), int(proc.channels))


def _read_audio(path: Path, what: str) -> tuple[np.ndarray, int]:
    """(frames, channels) float64 samples and the sample rate; ValueError names the file."""
    import soundfile as sf
    try:
        samples, rate = sf.read(str(path), dtype="float64", always_2d=True)
    except Exception as err:  # libsndfile errors, truncated files
        raise ValueError(f"cannot read {what} file {path}: {err}") from None
    if samples.shape[0] == 0:
        raise ValueError(f"{what} file {path} is empty")
    bad = ~np.isfinite(samples)
    if bad.any():
        frame, channel = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(f"{what} file {path} has a non-finite sample ({samples[frame, channel]}) "
                         f"at frame {frame}, channel {channel}")
    return samples, int(rate)


# ----------------------------------------------------------------------------------------------
# Items: one (signal pair, audiogram, level1) per ear


@dataclasses.dataclass(frozen=True)
class LabelSettings:
    """Run-wide choices; recorded in every output row and checked on resume."""

    equalisation: int = 1
    level1: float | str = 65.0  # a number, or "cadenza"
    ears: str = "average"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.equalisation not in (1, 2):
            raise ValueError(f"equalisation must be 1 or 2, got {self.equalisation!r}")
        if self.level1 != "cadenza" and not (isinstance(self.level1, (int, float))
                                             and math.isfinite(self.level1)):
            raise ValueError(f"level1 must be a finite number or 'cadenza', got {self.level1!r}")
        if self.ears not in EAR_CHOICES:
            raise ValueError(f"ears must be one of {EAR_CHOICES}, got {self.ears!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")

    def recorded(self) -> dict[str, Any]:
        return {"equalisation": self.equalisation, "level1_rule": self.level1, "ears": self.ears,
                "dtype": self.dtype, "seed": self.seed}


def _ear_plan(row: LabelRow, probe: _Probe, ears: str) -> list[tuple[str, int]]:
    """[(ear name, channel)] the row is scored on; channel 1 reads the right channel of a stereo
    file (a mono file's only channel serves both ears). ValueError if an ear has no audiogram."""
    stereo = max(probe.reference_channels, probe.processed_channels) == 2
    if ears == "average":
        if "both" in row.audiograms:
            return [("left", 0), ("right", 1)] if stereo else [("both", 0)]
        missing = [e for e in ("left", "right") if e not in row.audiograms]
        if missing:
            raise ValueError(f"--ears average needs audiogram_{missing[0]} (or one 'audiogram')")
        return [("left", 0), ("right", 1)]
    if ears not in row.audiograms and "both" not in row.audiograms:
        raise ValueError(f"--ears {ears} needs audiogram_{ears} (or 'audiogram')")
    return [(ears, 0 if ears == "left" else 1)]


def _row_inputs(row: LabelRow, ears: Iterable[str]) -> dict[str, Any]:
    """What a row's label depends on besides its files and the run's settings: each scored ear's
    audiogram (8 dB HL at the standard frequencies) and the row's own level1 (or None)."""
    return {"audiograms": {ear: [float(v) for v in row.levels(ear)] for ear in ears},
            "level1": row.level1}


def _changed_since(label: dict[str, Any], row: LabelRow,
                   ears: Sequence[str] | None = None) -> str | None:
    """What differs between a row's label and the row the manifest has now, or None.

    Args:
      label: the row's line in the labels file.
      row: the manifest row of the same id.
      ears: the ears the row would be scored on now, or None to take the label's.
    Returns:
      A short description of the first difference (paths, ears, an audiogram, level1). Labels
      written before `inputs` was recorded are compared by their paths and a row's own level1
      only (their audiograms are unknown).
    """
    for key in ("reference", "processed"):
        before, now = label.get(key), getattr(row, key)
        # One file spelt two ways ("./a.wav", "a.wav") is no change: no relabelling.
        if not (isinstance(before, str) and isinstance(now, str)
                and os.path.normpath(before) == os.path.normpath(now)):
            return f"{key} {before!r} -> {now!r}"
    recorded = label.get("inputs")
    if not isinstance(recorded, dict):
        used = {e.get("level1") for e in (label.get("per_ear") or {}).values()}
        if row.level1 is not None and used != {row.level1}:
            return f"level1 {sorted(used)} -> {row.level1!r}"
        return None
    labelled = sorted(label.get("per_ear") or {})
    if ears is not None and sorted(ears) != labelled:
        return f"ears {labelled} -> {sorted(ears)}"
    try:
        now = _row_inputs(row, labelled)
    except ValueError as err:
        return str(err)
    for ear in labelled:
        before = (recorded.get("audiograms") or {}).get(ear)
        if before != now["audiograms"][ear]:
            return f"{ear} audiogram {before} -> {now['audiograms'][ear]}"
    if recorded.get("level1") != now["level1"]:
        return f"level1 {recorded.get('level1')!r} -> {now['level1']!r}"
    return None


def _channel(samples: np.ndarray, channel: int) -> np.ndarray:
    return samples[:, min(channel, samples.shape[1] - 1)]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def cadenza_level1(reference: np.ndarray) -> float:
    """level1 = 65 - 20 log10(rms(reference)), dB SPL of RMS 1 (Cadenza recipes)."""
    return 65.0 - 20.0 * math.log10(_rms(reference))


def item_key(seed: int, row_key: str, ear: str) -> np.ndarray:
    """(2,) uint32 PRNG key of one ear of one row: from the seed, the row id and the ear only,
    so a row's threshold noise does not depend on the batch it lands in."""
    import jax
    row_hash = zlib.crc32(row_key.encode()) & 0x7FFFFFFF
    key = jax.random.fold_in(jax.random.PRNGKey(seed), row_hash)
    return np.asarray(jax.random.fold_in(key, 1 if ear == "right" else 0))


@dataclasses.dataclass(frozen=True)
class _Item:
    row: int  # position of the row in its batch
    ear: str
    reference: np.ndarray  # (n,)
    processed: np.ndarray  # (n,)
    levels: np.ndarray  # (8,) dB HL at STANDARD_FREQUENCIES
    level1: float
    key: np.ndarray  # (2,) uint32 PRNG key of this item's threshold noise


def _row_items(row: LabelRow, position: int, ears: list[tuple[str, int]],
               settings: LabelSettings) -> list[_Item]:
    """Reads and checks one row's audio and makes its per-ear items; ValueError on bad audio."""
    reference, ref_rate = _read_audio(row.reference_path, "reference")
    processed, proc_rate = _read_audio(row.processed_path, "processed")
    if ref_rate != proc_rate:
        raise ValueError(f"sample rates differ: reference {ref_rate} Hz, processed {proc_rate} Hz")
    if reference.shape[0] != processed.shape[0]:
        raise ValueError(f"lengths differ: reference {reference.shape[0]} samples, processed "
                         f"{processed.shape[0]} samples")
    items = []
    for ear, channel in ears:
        ref = _channel(reference, channel)
        if np.max(np.abs(ref)) < SILENCE_PEAK:
            side = "" if reference.shape[1] == 1 else f" ({ear} channel)"
            raise ValueError(f"reference file {row.reference_path} is silent{side}")
        if row.level1 is not None:
            level1 = row.level1
        elif settings.level1 == "cadenza":
            level1 = cadenza_level1(ref)
        else:
            level1 = float(settings.level1)
        items.append(_Item(position, ear, ref, _channel(processed, channel).copy(),
                           row.levels(ear), level1, item_key(settings.seed, row.key, ear)))
    return items


# ----------------------------------------------------------------------------------------------
# Planning: sort by (rate, length), pack rows into batches of at most `batch_items` items


@dataclasses.dataclass(frozen=True)
class _Batch:
    sample_rate: int
    rows: tuple[LabelRow, ...]
    ears: tuple[tuple[tuple[str, int], ...], ...]  # per row


def _plan(probed: list[tuple[LabelRow, _Probe, list[tuple[str, int]]]],
          batch_items: int) -> list[_Batch]:
    order = sorted(probed, key=lambda t: (t[1].sample_rate, t[1].frames, t[0].line))
    batches, current, count = [], [], 0
    for entry in order:
        n_items = len(entry[2])
        if current and (count + n_items > batch_items
                        or entry[1].sample_rate != current[0][1].sample_rate):
            batches.append(current)
            current, count = [], 0
        current.append(entry)
        count += n_items
    if current:
        batches.append(current)
    return [_Batch(b[0][1].sample_rate, tuple(e[0] for e in b), tuple(tuple(e[2]) for e in b))
            for b in batches]


# ----------------------------------------------------------------------------------------------
# Output files


def _read_done(path: Path | None) -> list[dict[str, Any]]:
    """Rows already in a JSONL output. A final line cut off by a kill (no newline) is removed
    from the file, after the complete lines before it were checked to be JSON rows with an id."""
    from haaqi_jax.files import complete_lines
    if path is None:
        return []
    done = []

    def parse(lines: list[str]) -> None:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not JSON ({err.msg}); is it a labels "
                                 f"file?") from None
            if not isinstance(obj, dict) or "id" not in obj:
                raise ValueError(f"{path}, line {number}: no 'id'; is it a labels file?")
            done.append(obj)

    complete_lines(path, check=parse)
    return done


class _JsonlAppender:
    """Appends rows and makes them durable (flush + fsync) at every `commit`."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")

    def write(self, obj: dict[str, Any]) -> None:
        self._file.write(json.dumps(obj, allow_nan=False) + "\n")

    def commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# ----------------------------------------------------------------------------------------------
# Scoring a batch


def _stack(items: list[_Item], size: int) -> dict[str, np.ndarray]:
    """Zero-padded (size, N) arrays; slots past len(items) repeat item 0 (results dropped)."""
    filled = items + [items[0]] * (size - len(items))
    lengths = np.asarray([it.reference.size for it in filled], dtype=np.int32)
    reference = np.zeros((size, int(lengths.max())), dtype=np.float64)
    processed = np.zeros_like(reference)
    for slot, it in enumerate(filled):
        reference[slot, :it.reference.size] = it.reference
        processed[slot, :it.processed.size] = it.processed
    return {"reference": reference, "processed": processed, "lengths": lengths,
            "levels": np.stack([it.levels for it in filled]),
            "level1": np.asarray([it.level1 for it in filled], dtype=np.float64),
            "keys": np.stack([it.key for it in filled])}


def _scores(result: Any, size: int) -> np.ndarray:
    scores = np.stack([np.asarray(getattr(result, name), dtype=np.float64)
                       for name in COMPONENTS], axis=1)
    if scores.shape != (size, len(COMPONENTS)):
        raise RuntimeError(f"the metric returned scores of shape {scores.shape}, expected "
                           f"({size}, {len(COMPONENTS)})")
    return scores


def _prepare_with_api(items: list[_Item], sample_rate: int, settings: LabelSettings) -> list:
    """haaqi_jax.haaqi.api.prepare_batch of the items (host side; bad items are reported)."""
    from haaqi_jax.haaqi import api
    arrays = _stack(items, len(items))
    return api.prepare_batch(arrays["reference"], arrays["processed"], sample_rate,
                             arrays["levels"], STANDARD_FREQUENCIES,
                             equalisation=settings.equalisation, level1=arrays["level1"],
                             lengths=arrays["lengths"])


#: The reason recorded for a pair that does not fit in memory even alone.
_OUT_OF_MEMORY = ("out of memory scoring this {seconds:.1f} s pair alone (memory grows with "
                  "the length: cut the piece into parts, or label it on a larger machine)")


def _score_with_api(items: list[_Item], prepared: list, size: int, sample_rate: int,
                    settings: LabelSettings) -> tuple[np.ndarray, dict[int, str]]:
    """haaqi_jax.haaqi.api: `prepare_batch` (done by `_prepare_with_api`) reports bad items one
    by one, `score_prepared` scores the good ones, padded to `size` items so that every call
    has the same shape."""
    from haaqi_jax.haaqi import api
    keys = np.stack([it.key for it in items])
    errors = {i: reason.removeprefix(f"item {i}: ")
              for i, (_, reason) in enumerate(prepared) if reason is not None}
    good = [i for i in range(len(items)) if i not in errors]
    scores = np.full((len(items), len(COMPONENTS)), np.nan)
    if not good:
        return scores, errors

    def call(chosen: list[int], rows: int) -> np.ndarray:
        # A short batch is padded only up to whole calls of the items per call a full batch
        # of `rows` uses: the same compiled shape, and no call that scores copies alone (a
        # long pair on a CPU goes one item per call: a lone 60 s pair was scored 8 times).
        length = api.bucket_length(max(prepared[i][0].n for i in chosen))
        devices = metric_devices(settings, None)
        auto = api.default_chunking(length, devices, np.dtype(settings.dtype))[0]
        per_call = api.balanced_chunk(rows, auto, len(devices))
        rows = min(rows, -(-len(chosen) // per_call) * per_call)
        slots = chosen + [chosen[0]] * (rows - len(chosen))
        result = api.score_prepared([prepared[i][0] for i in slots], key=keys[slots],
                                    dtype=np.dtype(settings.dtype).type, chunk=per_call,
                                    progress=False)
        return _scores(result, rows)[:len(chosen)]

    try:
        scores[good] = call(good, size)
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        # One pair too long for this machine must not take its batch with it: each alone.
        _score_alone(lambda i: call([i], 1)[0], good, items, sample_rate, scores, errors)
    return scores, errors


def _score_alone(score_one: Callable[[int], np.ndarray], indices: Iterable[int],
                 items: list[_Item], sample_rate: int, scores: np.ndarray,
                 errors: dict[int, str]) -> None:
    """Scores items one at a time into `scores` (rows = item indices); an item the metric
    refuses (ValueError) or that does not fit in memory even alone gets its reason in
    `errors` instead."""
    for i in indices:
        try:
            scores[i] = score_one(i)
        except ValueError as err:
            errors[i] = str(err)
        except (MemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            errors[i] = _OUT_OF_MEMORY.format(seconds=len(items[i].reference) / sample_rate)


def _score_with(scorer: Scorer, items: list[_Item], size: int, sample_rate: int,
                settings: LabelSettings) -> tuple[np.ndarray, dict[int, str]]:
    """Any `haaqi_batch`-compatible scorer. If it rejects the batch (ValueError), each item is
    rescored alone (same batch shape, so no new compile) to find the bad ones."""

    def call(chosen: list[_Item]) -> np.ndarray:
        arrays = _stack(chosen, size)
        result = scorer(arrays["reference"], arrays["processed"], sample_rate, arrays["levels"],
                        np.asarray(STANDARD_FREQUENCIES), equalisation=settings.equalisation,
                        level1=arrays["level1"], lengths=arrays["lengths"], key=arrays["keys"],
                        dtype=np.dtype(settings.dtype).type)
        return _scores(result, size)[:len(chosen)]

    try:
        return call(items), {}
    except (ValueError, MemoryError, RuntimeError) as err:
        if not isinstance(err, ValueError) and not is_out_of_memory(err):
            raise
        scores = np.full((len(items), len(COMPONENTS)), np.nan)
        errors: dict[int, str] = {}
        _score_alone(lambda i: call([items[i]])[0], range(len(items)), items, sample_rate,
                     scores, errors)
        return scores, errors


@dataclasses.dataclass
class _Loaded:
    """One batch's host work: its items, the rows whose audio failed, and (built-in metric)
    the prepared pairs."""

    items: list[_Item]
    errors: dict[int, RowError]
    prepared: list | None


def _load_batch(batch: _Batch, scorer: Scorer | None, settings: LabelSettings) -> _Loaded:
    """Reads a batch's audio and, for the built-in metric, prepares its pairs (host side)."""
    errors: dict[int, RowError] = {}
    items: list[_Item] = []
    for position, (row, ears) in enumerate(zip(batch.rows, batch.ears)):
        try:
            items.extend(_row_items(row, position, list(ears), settings))
        except ValueError as err:
            errors[position] = RowError(row.id, row.line, "audio", str(err), row.reference,
                                        row.processed)
    prepared = (_prepare_with_api(items, batch.sample_rate, settings)
                if items and scorer is None else None)
    return _Loaded(items, errors, prepared)


def _score_batch(batch: _Batch, loaded: _Loaded, todo: set[str], scorer: Scorer | None,
                 size: int, settings: LabelSettings) -> tuple[list[dict], list[RowError]]:
    """Labels and errors for the rows of one loaded batch whose key is in `todo`."""
    from haaqi_jax.haaqi.backend import nothing_audible
    items, errors = loaded.items, dict(loaded.errors)
    scores, item_errors = np.zeros((0, len(COMPONENTS))), {}
    if items:
        if scorer is None:
            scores, item_errors = _score_with_api(items, loaded.prepared, size,
                                                  batch.sample_rate, settings)
        else:
            scores, item_errors = _score_with(scorer, items, size, batch.sample_rate, settings)
    for i, item in enumerate(items):
        reason = item_errors.get(i)
        if reason is None and not np.all(np.isfinite(scores[i])):
            reason = "the metric returned a non-finite score"
        if reason is not None and item.row not in errors:
            row = batch.rows[item.row]
            errors[item.row] = RowError(row.id, row.line, "metric", f"{item.ear} ear: {reason}",
                                        row.reference, row.processed)
    labels = []
    for position, row in enumerate(batch.rows):
        if row.key not in todo or position in errors:
            continue
        mine = [i for i, it in enumerate(items) if it.row == position]
        per_ear = {items[i].ear: {**{n: float(v) for n, v in zip(COMPONENTS, scores[i])},
                                  "level1": items[i].level1} for i in mine}
        for values in per_ear.values():
            values["audible"] = not bool(nothing_audible(values["cephigh"], values["bmsync5"]))
        labels.append({
            "id": row.id, "line": row.line, "reference": row.reference,
            "processed": row.processed,
            "haaqi": float(np.mean([e["combined"] for e in per_ear.values()])),
            "per_ear": per_ear,
            "inputs": _row_inputs(row, [ear for ear, _ in batch.ears[position]]),
            "sample_rate": batch.sample_rate, **settings.recorded()})
    return labels, [e for p, e in sorted(errors.items()) if batch.rows[p].key in todo]


# ----------------------------------------------------------------------------------------------
# The whole manifest


@dataclasses.dataclass(frozen=True)
class LabelSummary:
    """What a `label_manifest` call did. n_rows: rows in the manifest (after `limit`);
    n_ok / n_failed: labelled / failed in this call; n_skipped: labelled before it; n_retried:
    rows that had failed before and were tried again (counted in n_ok or n_failed); changed:
    (id, what changed) of the labelled rows whose manifest entry had changed since, so their old
    labels were removed and they were labelled again (counted in n_ok or n_failed);
    inaudible: ids of the rows labelled in this call with an ear whose reference HAAQI found
    inaudible (`per_ear[ear]["audible"]` false; `backend.nothing_audible`)."""

    n_rows: int
    n_ok: int
    n_failed: int
    n_skipped: int
    seconds: float
    out_path: Path
    errors_path: Path
    training: TrainingManifestSummary | None = None
    n_retried: int = 0
    changed: tuple[tuple[str, str], ...] = ()
    inaudible: tuple[str, ...] = ()

    def __str__(self) -> str:
        retried = f" ({self.n_retried} had failed before)" if self.n_retried else ""
        lines = [f"{self.n_rows} rows: {self.n_ok} labelled, {self.n_failed} failed{retried}, "
                 f"{self.n_skipped} already done ({self.seconds:.1f} s) -> {self.out_path}"
                 + (f" (errors: {self.errors_path})" if self.n_failed else "")]
        if self.changed:
            lines.append(f"{len(self.changed)} labelled row(s) had changed in the manifest: "
                         f"their old labels removed, scored again (counted above; e.g. id "
                         f"{self.changed[0][0]!r}: {self.changed[0][1]})")
        if self.inaudible:
            lines.append(f"warning: {len(self.inaudible)} row(s) have an ear whose reference is "
                         f"below the listener's threshold (e.g. id {self.inaudible[0]!r}): HAAQI "
                         f"scores such an ear 0.162 for any processing as quiet ('audible': "
                         f"false); check level1 and the audiograms")
        if self.training is not None:
            lines.append(str(self.training))
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class TrainingManifestSummary:
    """What `write_training_manifest` wrote. n_rows: training rows (one per ear); n_labels:
    labelled manifest rows they came from; left_out: (label id, or training id of one ear,
    reason) of what was not written (absent from the manifest, unusable scores, an inaudible
    ear, processed audio the encoder refuses)."""

    path: Path
    n_rows: int
    n_labels: int
    left_out: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        text = f"training manifest: {self.n_rows} rows from {self.n_labels} labels -> {self.path}"
        if self.left_out:
            shown = 10
            text += f"; {len(self.left_out)} left out:"
            text += "".join(f"\n  id {key!r}: {reason}" for key, reason in self.left_out[:shown])
            if len(self.left_out) > shown:
                text += f"\n  ... and {len(self.left_out) - shown} more"
        return text


def training_rows(label: dict[str, Any], row: LabelRow) -> list[Any]:
    """The training-manifest rows (`haaqi_jax.data.manifest.ManifestRow`) of one labelled row.

    Args:
      label: one row of a labels file (its `per_ear` scores).
      row: the manifest row it was computed from (paths, audiograms, split, distortion).
    Returns:
      One ManifestRow per scored ear (see the module docstring for ids, channel and group).
    Raises:
      ValueError naming the id and ear when a score or part is missing or not finite.
    """
    from haaqi_jax.data.manifest import COMPONENT_NAMES, ManifestRow, label_fields

    per_ear = label.get("per_ear")
    if not isinstance(per_ear, dict) or not per_ear:
        raise ValueError(f"label row id {row.id!r}: no 'per_ear' scores; is it a labels file?")
    several = len(per_ear) > 1
    out = []
    for ear in sorted(per_ear):
        scores = per_ear[ear]
        try:
            fields = label_fields(scores["combined"], {k: scores[k] for k in COMPONENT_NAMES})
        except KeyError as err:
            raise ValueError(f"label row id {row.id!r}, {ear} ear: no {err.args[0]!r}") from None
        except ValueError as err:
            raise ValueError(f"label row id {row.id!r}, {ear} ear: {err}") from None
        out.append(ManifestRow(
            id=f"{row.key}/{ear}" if several else row.key,
            file_path=_clean_path(row.processed_path), reference=_clean_path(row.reference_path),
            audiogram=row.levels(ear),
            haaqi_score=fields["haaqi_score"],
            haaqi_components=tuple(fields["haaqi_components"][k] for k in COMPONENT_NAMES),
            channel=None if ear == "both" else ear, group=row.key if several else None,
            split=row.split, distortion=row.distortion))
    return out


def _untrainable(scores: dict[str, Any], row: Any) -> str | None:
    """Why a training row (one ear of a label) is left out of the training manifest, else
    None: processed audio that train.py's encoder refuses (shorter than one BEATs patch at 16
    kHz, silent: the input pipeline's own check), or an ear HAAQI found inaudible (its score
    is the metric's floor, whatever the processing: a label a model should not learn from)."""
    from haaqi_jax.data.audio import check_waveform, load_audio
    if scores.get("audible") is False:
        return ("inaudible: the reference is below the listener's threshold, so the score is "
                "HAAQI's floor, not the clip's quality")
    try:
        check_waveform(load_audio(row.file_path, 16000, row.channel), name=str(row.file_path))
    except (OSError, ValueError) as err:
        return f"the encoder cannot read it: {err}"
    return None


def _clean_path(path: Path) -> Path:
    """Absolute, with "a/../b" folded (no symlinks resolved): readable paths in the manifest."""
    return Path(os.path.normpath(path.absolute()))


def write_training_manifest(labels_path: str | os.PathLike, manifest_path: str | os.PathLike,
                            out_path: str | os.PathLike) -> TrainingManifestSummary:
    """Writes the manifest `train.py` reads from a labels file and the manifest it labelled.

    Args:
      labels_path: the labels JSONL of `label_manifest` / `haaqi-jax label --out`.
      manifest_path: the label manifest (paths, audiograms, split, distortion per row id).
      out_path: the training manifest (JSONL, written atomically; paths inside its folder are
        written relative to it).
    Returns:
      TrainingManifestSummary; a label row that is absent from the manifest or has unusable
      scores is left out and reported there. Raises ValueError when no row could be written.
    """
    from haaqi_jax.data.manifest import write_manifest

    labels = _read_done(Path(labels_path).expanduser())
    rows, invalid = read_label_manifest(manifest_path)
    by_key = {row.key: row for row in rows}
    invalid_reasons = {e.key: e.reason for e in invalid}
    training, left_out, used, seen = [], [], 0, set()
    for label in labels:
        key = str(label["id"])
        if key in seen:
            left_out.append((key, "a second label with this id (two runs wrote one labels file)"))
            continue
        seen.add(key)
        row = by_key.get(key)
        if row is None:
            left_out.append((key, f"the manifest row is invalid now: {invalid_reasons[key]}"
                             if key in invalid_reasons
                             else f"no row with this id in {manifest_path}"))
            continue
        changed = _changed_since(label, row)
        if changed is not None:
            left_out.append((row.key, f"the manifest row changed since it was labelled "
                                      f"({changed}): rerun haaqi-jax label"))
            continue
        try:
            ear_rows = training_rows(label, row)
        except ValueError as err:
            left_out.append((row.key, str(err)))
            continue
        kept = []
        for ear, ear_row in zip(sorted(label["per_ear"]), ear_rows):
            reason = _untrainable(label["per_ear"][ear], ear_row)
            if reason is None:
                kept.append(ear_row)
            else:
                left_out.append((str(ear_row.id), reason))
        training += kept
        used += bool(kept)
    if not training:
        raise ValueError(f"{labels_path}: no labelled row of {manifest_path} to write"
                         + (f" ({left_out[0][0]!r}: {left_out[0][1]})" if left_out else ""))
    path = write_manifest(out_path, training)
    return TrainingManifestSummary(path, len(training), used, tuple(left_out))


def default_errors_path(out_path: str | os.PathLike) -> Path:
    out_path = Path(out_path)
    stem = out_path.name[:-len(".jsonl")] if out_path.name.endswith(".jsonl") else out_path.name
    return out_path.with_name(stem + ".errors.jsonl")


def _check_settings(done: Sequence[dict[str, Any]], settings: LabelSettings, path: Path) -> None:
    want = settings.recorded()
    for obj in done[:1]:
        if "per_ear" not in obj:
            raise ValueError(f"{path}, line 1: no 'per_ear' scores: not a labels file of "
                             f"`haaqi-jax label` (an errors file or a manifest?); name another "
                             f"--out")
        have = {k: obj.get(k) for k in want}
        if have != want:
            diff = ", ".join(f"{k}={have[k]!r} (now {want[k]!r})"
                             for k in want if have[k] != want[k])
            raise ValueError(f"{path} was written with other settings: {diff}; rerun with the same "
                             f"settings or write to a new --out")


def metric_devices(settings: LabelSettings, scorer: Scorer | None) -> list[Any]:
    """The local devices the metric runs on: for the built-in one those of
    `placement.compute_devices` (the host's CPU devices for float64 where the default backend
    lacks it, e.g. on a TPU host), for a custom `scorer` all local devices."""
    import jax

    from haaqi_jax.haaqi import placement
    if scorer is not None:
        return list(jax.local_devices())
    return placement.compute_devices(np.dtype(settings.dtype))


def default_batch_size(devices: Sequence[Any]) -> int:
    """Items per metric call when none is given: 8 on CPU (memory is shared with the host and
    the metric is compute bound there), 64 per accelerator (a GPU fills only with many clips
    at once: on an H100 the metric took 0.32 s per ten-second clip in calls of 3 clips and
    0.011-0.019 s in calls of 64)."""
    if all(d.platform == "cpu" for d in devices):
        return 8
    return 64 * len(devices)


def label_manifest(manifest_path: str | os.PathLike, out_path: str | os.PathLike, *,
                   errors_path: str | os.PathLike | None = None, batch_size: int | None = None,
                   equalisation: int = 1, level1: float | str = 65.0, ears: str = "average",
                   dtype: str = "float32", seed: int = 0, limit: int | None = None,
                   scorer: Scorer | None = None, progress: bool = True,
                   manifest_out: str | os.PathLike | None = None) -> LabelSummary:
    """Writes HAAQI labels for every row of a manifest to `out_path` (JSONL), resumably.

    Args:
      manifest_path: JSONL or CSV manifest (format in the module docstring).
      out_path: labels JSONL; rows already in it (by id) are skipped, new ones appended; a row
        whose manifest entry changed since it was labelled is labelled again (old line removed).
      errors_path: JSONL of failed rows (id, line, stage, reason); default OUT.errors.jsonl.
        Rows in it are tried again (a file may have been fixed); a file that holds other rows
        (a labels file given by mistake) is refused, not overwritten.
      batch_size: HAAQI items (ears) per metric call, rounded up to a multiple of the
        metric's device count (`metric_devices`; and to at least one row's ears); every call
        has this shape. Default `default_batch_size()`: 8 on CPU, 64 per accelerator.
      equalisation: 1 (NAL-R applied to the reference) or 2 (reference already amplified).
      level1: dB SPL of RMS 1, or "cadenza" (65 - 20 log10 rms(reference), per ear); a row's own
        `level1` wins.
      ears: "average" (every ear the row has, combined scores averaged), "left" or "right".
      dtype: "float32" or "float64" (the metric's compute precision). TPUs have no float64:
        there "float64" labels on the host's CPU devices, at CPU speed and batch size, with a
        warning, and writes a CPU host's labels; "float32" labels on the TPUs.
      seed: threshold-noise seed; each row's ears fold in a hash of its id (see `item_key`).
      limit: label only the first `limit` rows of the manifest.
      scorer: a `haaqi_batch`-compatible metric to use instead of haaqi_jax.haaqi.api (whose
      prepare_batch + score_prepared report bad items one by one); `key` gets (B, 2) per-item
      keys.
      progress: show a tqdm bar.
      manifest_out: also write the training manifest of every row labelled so far there
        (`write_training_manifest`), after the labelling (not when no row has a label).

    Returns:
      LabelSummary. Raises ValueError for bad arguments, an unreadable manifest, or an output
      written with other settings; per-row problems never raise (they go to the errors file).
    """
    start = time.perf_counter()
    settings = LabelSettings(equalisation, level1 if isinstance(level1, str) else float(level1),
                             ears, dtype, int(seed))
    if batch_size is None:
        batch_size = default_batch_size(metric_devices(settings, scorer))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    out_path = Path(out_path).expanduser()
    errors_path = (default_errors_path(out_path) if errors_path is None
                   else Path(errors_path).expanduser())
    manifest_out = None if manifest_out is None else Path(manifest_out).expanduser()
    with _sole_writer(out_path):
        return _label_rows(manifest_path, out_path, errors_path, batch_size, settings, limit,
                           scorer, progress, manifest_out, start)


@contextlib.contextmanager
def _sole_writer(out_path: Path) -> Iterator[None]:
    """Holds an exclusive lock on `<out folder>/.<out name>.lock` while a run writes OUT: two
    runs on one OUT would both label the rows left to do and write them twice. The lock file
    stays (deleting it would let a third run lock a new file while a second holds the old);
    OUT's real path names it, so a symlink to OUT finds the same lock."""
    from haaqi_jax.files import exclusive_lock
    real = out_path.resolve()
    lock_path = real.with_name(f".{real.name}.lock")
    with exclusive_lock(lock_path, f"another `haaqi-jax label` is writing {out_path} (lock "
                                   f"{lock_path}); wait for it, or write to another --out"):
        yield


def _label_rows(manifest_path, out_path: Path, errors_path: Path, batch_size: int,
                settings: LabelSettings, limit: int | None, scorer: Scorer | None,
                progress: bool, manifest_out, start: float) -> LabelSummary:
    """`label_manifest` after its arguments are checked, with OUT locked."""
    from tqdm.auto import tqdm

    done_labels = _read_done(out_path)
    _check_settings(done_labels, settings, out_path)
    labelled = {str(o["id"]): o for o in done_labels}
    previous_errors = _read_done(errors_path)
    if any("reason" not in o for o in previous_errors):
        raise ValueError(f"{errors_path} holds rows without a 'reason': it is not an errors file "
                         f"of `haaqi-jax label` (a labels file?); name another --errors")

    rows, manifest_errors = read_label_manifest(manifest_path, limit=limit)
    n_rows = len(rows) + len(manifest_errors)
    new_errors = list(manifest_errors)      # the manifest's own faults (e.g. a duplicate id)
    probed = []
    changed: dict[str, str] = {}            # labelled rows whose manifest entry changed since
    for row in rows:
        label = labelled.get(row.key)
        try:
            probe = _probe(row)
            ears = _ear_plan(row, probe, settings.ears)
        except ValueError as err:
            # A labelled row whose files fail now keeps its label unless the row changed.
            reason = None if label is None else _changed_since(label, row)
            if label is None or reason is not None:
                new_errors.append(RowError(row.id, row.line, "audio", str(err), row.reference,
                                           row.processed))
            if reason is not None:
                changed[row.key] = reason
            continue
        reason = None if label is None else _changed_since(label, row, [e for e, _ in ears])
        if reason is not None:
            changed[row.key] = reason
        probed.append((row, probe, ears))
    valid = {row.key for row in rows}     # a duplicate id's error shares a valid row's key
    for error in manifest_errors:         # a labelled row made invalid: its label is stale too
        if error.key in labelled and error.key not in valid:
            changed[error.key] = "the row is invalid now"
    done = set(labelled) - set(changed)
    # Rows that failed before are tried again (a file may have been fixed since): their old
    # entries go, and a row that fails again is written anew.
    failed_before = {str(o["id"]) for o in previous_errors} - done
    devices = len(metric_devices(settings, scorer))
    widest = max((len(p[2]) for p in probed), default=1)
    size = -(-max(batch_size, widest) // devices) * devices
    batches = [b for b in _plan(probed, size) if any(r.key not in done for r in b.rows)]

    if errors_path.exists():                 # only now: a manifest that cannot be read
        errors_path.write_text("")           # leaves the old entries in place
    if changed:                              # their old labels go; they are labelled below
        from haaqi_jax.data.manifest import write_manifest
        write_manifest(out_path, [o for o in done_labels if str(o["id"]) not in changed])
    labels_out, errors_out = _JsonlAppender(out_path), _JsonlAppender(errors_path)
    reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="label-reader")
    n_ok, n_failed, inaudible = 0, 0, []
    try:
        for error in new_errors:
            errors_out.write(error.to_json())
        errors_out.commit()
        n_failed += len(new_errors)
        pending = sum(r.key not in done for b in batches for r in b.rows)
        # Rows refused before scoring (unreadable files, manifest faults) count as done.
        with tqdm(total=pending + len(new_errors), initial=len(new_errors), unit="row",
                  desc="HAAQI labels", disable=not progress, dynamic_ncols=True) as bar:
            bar.set_postfix(ok=n_ok, failed=n_failed, refresh=False)
            # One thread reads and prepares the next batch while this one is scored, so that
            # the host work and the device's overlap (the device waits less on a GPU).
            ahead = reader.submit(_load_batch, batches[0], scorer, settings) if batches else None
            for k, batch in enumerate(batches):
                loaded = ahead.result()
                if k + 1 < len(batches):
                    ahead = reader.submit(_load_batch, batches[k + 1], scorer, settings)
                todo = {r.key for r in batch.rows} - done
                labels, errors = _score_batch(batch, loaded, todo, scorer, size, settings)
                for obj in labels:
                    labels_out.write(obj)
                for error in errors:
                    errors_out.write(error.to_json())
                labels_out.commit()
                errors_out.commit()
                n_ok += len(labels)
                n_failed += len(errors)
                inaudible += [str(o["id"]) for o in labels
                              if not all(e["audible"] for e in o["per_ear"].values())]
                bar.update(len(todo))
                bar.set_postfix(ok=n_ok, failed=n_failed, refresh=False)
    finally:
        reader.shutdown(wait=False, cancel_futures=True)
        labels_out.close()
        errors_out.close()
    training = None
    if manifest_out is not None and (done_labels or n_ok):  # nothing labelled: nothing to write
        training = write_training_manifest(out_path, manifest_path, manifest_out)
    return LabelSummary(n_rows, n_ok, n_failed, n_rows - n_ok - n_failed,
                        time.perf_counter() - start, out_path, errors_path, training,
                        n_retried=len(failed_before & ({str(r.key) for r in rows}
                                                       | {str(e.key) for e in manifest_errors})),
                        changed=tuple(changed.items()), inaudible=tuple(inaudible))


# ----------------------------------------------------------------------------------------------
# CLI


def _level1_arg(text: str) -> float | str:
    if text.lower() == "cadenza":
        return "cadenza"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'cadenza', got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"level1 must be finite, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `label` subcommand's arguments."""
    from haaqi_jax.cli import positive_int
    parser.add_argument("manifest", type=Path, help="JSONL or CSV manifest of reference/processed "
                        "pairs with audiograms")
    parser.add_argument("--out", type=Path, required=True, help="labels JSONL (appended; rows "
                        "already there are skipped, rows in the errors file tried again)")
    parser.add_argument("--errors", type=Path, default=None,
                        help="failed rows JSONL (default: OUT with .errors.jsonl)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="HAAQI items (ears) per metric call (default: 8 on CPU, 64 per "
                             "GPU/TPU, where the device fills only with many clips at once)")
    parser.add_argument("--equalisation", type=int, choices=(1, 2), default=1,
                        help="1: apply NAL-R to the reference (default); 2: reference already "
                             "amplified")
    parser.add_argument("--level1", type=_level1_arg, default=65.0,
                        help="dB SPL of RMS 1, or 'cadenza' for 65 - 20 log10 rms(reference) "
                             "(default 65; a row's own level1 wins)")
    parser.add_argument("--ears", choices=EAR_CHOICES, default="average",
                        help="score both ears and average (default), or one ear")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                        help="metric precision (default float32; float64 labels do not move "
                             "with their batch, and run on the host CPU on a TPU host, which "
                             "has no float64)")
    parser.add_argument("--seed", type=int, default=0, help="threshold-noise seed (default 0)")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="label only the first N manifest rows")
    parser.add_argument("--manifest-out", type=Path, default=None, metavar="TRAIN.jsonl",
                        help="also write the training manifest train.py reads: one row per "
                             "scored ear (score, parts, that ear's audiogram and channel)")
    parser.add_argument("--plot", type=Path, default=None, metavar="LABELS.png",
                        help="with --manifest-out: draw its labels there, per split and per "
                             "distortion type where its rows name them")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Runs `haaqi-jax label`; prints the summary. Returns 0, or 1 when rows failed in this run
    (the others are labelled; the failed ones are in the errors file, retried on a rerun)."""
    from haaqi_jax.cli import writable_file
    if Path(args.manifest).expanduser().is_dir():
        raise ValueError(f"manifest {args.manifest} is a folder; give the manifest file (JSONL "
                         f"or CSV)")
    if args.plot is not None and args.manifest_out is None:
        raise ValueError("--plot draws the training manifest's labels: give --manifest-out too")
    errors = default_errors_path(args.out) if args.errors is None else args.errors
    outputs = {"--out": args.out, "--errors": errors, "--manifest-out": args.manifest_out,
               "--plot": args.plot}
    named = {}
    for option, path in outputs.items():
        if path is None:
            continue
        resolved = writable_file(path, option).absolute()
        others = {Path(args.manifest).absolute(): "the manifest being labelled", **named}
        for other, name in others.items():
            if resolved == other or other in resolved.parents:
                raise ValueError(f"{option} {path} is {'inside ' if resolved != other else ''}"
                                 f"{name}")
        named[resolved] = option
    summary = label_manifest(args.manifest, args.out, errors_path=args.errors,
                             batch_size=args.batch_size, equalisation=args.equalisation,
                             level1=args.level1, ears=args.ears, dtype=args.dtype,
                             seed=args.seed, limit=args.limit, progress=not args.no_progress,
                             manifest_out=args.manifest_out)
    print(summary)
    if args.plot is not None and summary.training is not None:
        print(f"labels plot: {plot_labels(summary.training.path, args.plot)}")
    elif args.plot is not None:
        print(f"no labels plot: no row is labelled, so {args.plot} is not written",
              file=sys.stderr)
    return 1 if summary.n_failed else 0


def plot_labels(manifest: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Draws the labels of a training manifest (`--manifest-out`'s) into `path` with
    `data.overview.label_plot`: per split, and per distortion type where rows name one."""
    from haaqi_jax.data.manifest import read_manifest
    from haaqi_jax.data.overview import label_plot
    rows = read_manifest(manifest, require_label=True, progress=False)
    return label_plot([{"id": r.id, "haaqi_score": r.haaqi_score,
                        **{k: getattr(r, k) for k in ("split", "distortion")
                           if getattr(r, k) is not None}} for r in rows],
                      path, title=Path(manifest).name)
