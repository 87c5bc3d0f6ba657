"""Dataset manifests: one row per clip (audio file, listener audiogram, HAAQI label).

Two on-disk forms are read:

* JSON Lines (what `write_manifest` writes): one JSON object per line; blank lines and lines
  starting with `#` are ignored.
* The HAAQI-Net authors' `train.json`: one JSON document `{"data": [row, ...]}` (or a bare
  list of rows). Its "line" numbers below are the 1-based entry positions.

Row keys:
  file_path    str, required. Relative paths resolve against the manifest's folder.
  audiogram    8 numbers, dB HL at 250, 500, 1000, 2000, 3000, 4000, 6000, 8000 Hz, required.
  haaqi_score  number in [0, 1] or null/absent (unlabelled; refused when `require_label`).
  haaqi_components  {"nonlinear": x, "linear": y}, HAAQI's two parts in [0, 1], optional
               (written by the demo labeller; the `haaqi_components` loss needs them).
  reference    str path to the clean reference, optional (same resolution rule).
  split        str, optional (train, valid, test_seen, test_unseen, ...).
  id           str or int, optional; defaults to the line number. Must be unique.
  distortion   str, optional free text used for per-distortion evaluation.
  listener_shape  str, optional: the shape of the listener's audiogram (the demo's rows name
               one of `haaqi_jax.data.listeners.LISTENER_SHAPES`); the report breaks down by it.
  channel      "left" or "right", optional: read that channel of a stereo file instead of the
               mean of its channels (a mono file's only channel serves either).
  group        str or int, optional: rows sharing a group land in the same split when the
               manifest leaves the split to `split_rows` (e.g. the two ears of one clip).
Other keys are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from haaqi_jax.audiogram import validate_levels
from haaqi_jax.files import write_atomic

_OPTIONAL_TEXT_KEYS = ("split", "distortion", "listener_shape")
#: Values of a row's `channel` key; the index is the channel read from a stereo file.
CHANNELS = ("left", "right")
#: HAAQI's two parts, in the order of `ManifestRow.haaqi_components` and of batch["components"].
COMPONENT_NAMES = ("nonlinear", "linear")


@dataclasses.dataclass(frozen=True, eq=False)
class ManifestRow:
    """One validated manifest entry.

    Attributes:
      id: unique row id (the manifest's `id`, else the line number as text).
      file_path: absolute path of the (processed) audio clip.
      audiogram: (8,) float32 read-only, dB HL at the standard frequencies.
      haaqi_score: label in [0, 1], or None when unlabelled.
      haaqi_components: (nonlinear, linear) parts of the label, each in [0, 1], or None.
      reference: absolute path of the reference clip, or None.
      split: split name, or None.
      distortion: free-text distortion description, or None.
      line: 1-based line (JSONL) or entry number (JSON document) in the manifest; 0 when the
        row was built in code.
      channel: "left" or "right" (one channel of a stereo file), or None (the channel mean).
      group: rows with the same group are split together by `split_rows`, or None.
      listener_shape: the shape of the listener's audiogram (e.g. "flat"), or None.
    """

    id: str
    file_path: Path
    audiogram: np.ndarray
    haaqi_score: float | None = None
    reference: Path | None = None
    split: str | None = None
    distortion: str | None = None
    line: int = 0
    haaqi_components: tuple[float, float] | None = None
    channel: str | None = None
    group: str | None = None
    listener_shape: str | None = None

    def __post_init__(self) -> None:
        levels = validate_levels(self.audiogram, where=f"row {self.id!r}: key 'audiogram'")
        if levels.ndim != 1:
            raise ValueError(f"row {self.id!r}: key 'audiogram' must be 8 values, got shape "
                             f"{levels.shape}")
        levels.setflags(write=False)
        object.__setattr__(self, "audiogram", levels)
        object.__setattr__(self, "id", str(self.id))
        object.__setattr__(self, "file_path", Path(self.file_path))
        if self.reference is not None:
            object.__setattr__(self, "reference", Path(self.reference))
        if self.haaqi_score is not None:
            object.__setattr__(self, "haaqi_score", check_label(self.haaqi_score))
        if self.haaqi_components is not None:
            object.__setattr__(self, "haaqi_components",
                               _check_components(self.haaqi_components))
        if self.channel is not None and self.channel not in CHANNELS:
            raise ValueError(f"row {self.id!r}: key 'channel' must be one of {CHANNELS}, got "
                             f"{self.channel!r}")
        if self.group is not None:
            object.__setattr__(self, "group", str(self.group))

    def to_dict(self, relative_to: str | os.PathLike | None = None) -> dict[str, Any]:
        """JSON-able dict; paths are written relative to `relative_to` when inside it."""
        out: dict[str, Any] = {
            "id": self.id,
            "file_path": _path_text(self.file_path, relative_to),
            "audiogram": [float(v) for v in self.audiogram],
            "haaqi_score": self.haaqi_score,
        }
        if self.haaqi_components is not None:
            out["haaqi_components"] = dict(zip(COMPONENT_NAMES, self.haaqi_components))
        if self.reference is not None:
            out["reference"] = _path_text(self.reference, relative_to)
        for key in _OPTIONAL_TEXT_KEYS + ("channel", "group"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def describe(self) -> str:
        """Short text naming the row for error messages: line, id and file."""
        where = f"line {self.line}, " if self.line else ""
        return f"row ({where}id {self.id!r}, {self.file_path})"


class Manifest(list):
    """The rows `read_manifest` returns: a plain list of ManifestRow plus two attributes.

    Attributes:
      path: the manifest file read.
      skipped: ((line, reason), ...) of the rows dropped with on_error="skip" (else empty).
      skipped_ids: the id of each skipped row (as a row's `id`: the line when it has none),
        in the order of `skipped`.
    """

    def __init__(self, rows: Iterable[ManifestRow] = (), *, path: Path | None = None,
                 skipped: Sequence[tuple[int, str]] = (), skipped_ids: Sequence[str] = ()):
        super().__init__(rows)
        self.path = path
        self.skipped = tuple(skipped)
        self.skipped_ids = tuple(skipped_ids)


def check_label(value: Any, key: str = "haaqi_score") -> float:
    """A HAAQI label as a float: a finite number in [0, 1] (not a bool or a string).

    Raises:
      ValueError naming `key` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"key {key!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"key {key!r} must be a finite number in [0, 1], got {value!r}")
    return value


def _check_components(value: Any) -> tuple[float, float]:
    """{"nonlinear": x, "linear": y} (or a pair in that order) -> (x, y), each in [0, 1]."""
    if isinstance(value, Mapping):
        missing = [k for k in COMPONENT_NAMES if k not in value]
        if missing:
            raise ValueError(f"key 'haaqi_components' lacks {missing[0]!r} (expected "
                             f"{ {k: 0.5 for k in COMPONENT_NAMES} })")
        value = tuple(value[k] for k in COMPONENT_NAMES)
    if not isinstance(value, (tuple, list)) or len(value) != len(COMPONENT_NAMES):
        raise ValueError(f"key 'haaqi_components' must map {COMPONENT_NAMES} to numbers, got "
                         f"{value!r}")
    return tuple(check_label(v, f"haaqi_components.{k}")
                 for k, v in zip(COMPONENT_NAMES, value))


#: What HAAQI and its parts can give before clipping (see `label_fields`).
RAW_LABEL_RANGE = (-0.76, 1.0 + 1e-3)


def label_fields(score: float, components: Mapping[str, float] | None = None
                 ) -> dict[str, Any]:
    """A metric's raw outputs as manifest label keys: {"haaqi_score": s} plus, when the parts
    are given, {"haaqi_components": {"nonlinear": x, "linear": y}}, each clipped to [0, 1].

    Clipping is for HAAQI's own excursions: float32 rounding oversteps 1 by a hair, and a
    negative cepstral correlation takes the nonlinear part (0.754 c^3 + 0.246 sync, at least
    -0.754) and the score (HAAQI's polynomial, at least -0.056) below 0.

    Raises ValueError naming the value when one is not finite or is outside what HAAQI can
    give (above 1 + 1e-3, below -0.76): a labeller bug rather than rounding.
    """
    def clipped(value: float, key: str) -> float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{key} is not finite ({value})")
        if not RAW_LABEL_RANGE[0] <= value <= RAW_LABEL_RANGE[1]:
            raise ValueError(f"{key} = {value:g} is outside what HAAQI can give "
                             f"({RAW_LABEL_RANGE}); check the labeller")
        return min(max(value, 0.0), 1.0)

    out: dict[str, Any] = {"haaqi_score": clipped(score, "haaqi_score")}
    if components is not None:
        out["haaqi_components"] = {k: clipped(components[k], f"haaqi_components.{k}")
                                   for k in COMPONENT_NAMES}
    return out


def _path_text(path: Path, relative_to: str | os.PathLike | None) -> str:
    if relative_to is not None:
        try:
            return Path(path).relative_to(Path(relative_to).absolute()).as_posix()
        except ValueError:
            pass
    return Path(path).as_posix()


def _resolve(text: Any, key: str, base: Path) -> Path:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"key {key!r} must be a non-empty path string, got {text!r}")
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _check_file(path: Path, key: str) -> None:
    from haaqi_jax.data.audio import audio_info
    try:
        info = audio_info(path)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"key {key!r}: {err}") from None
    if info.frames <= 0:
        raise ValueError(f"key {key!r}: {path} holds no samples")


def _parse_row(obj: Any, *, line: int, base: Path, require_label: bool,
               check_files: bool, read_labels: bool = True) -> ManifestRow:
    """Validates one decoded entry; raises ValueError(reason) without location prefix."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("file_path", "audiogram"):
        if key not in obj:
            raise ValueError(f"missing key {key!r}")
    row_id = obj.get("id", line)
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or str(row_id) == "":
        raise ValueError(f"key 'id' must be a non-empty string or an integer, got {row_id!r}")
    file_path = _resolve(obj["file_path"], "file_path", base)
    reference = obj.get("reference")
    reference = None if reference is None else _resolve(reference, "reference", base)
    audiogram = obj["audiogram"]
    if not isinstance(audiogram, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in audiogram):
        raise ValueError(f"key 'audiogram' must be a list of 8 numbers, got {audiogram!r}")
    levels = validate_levels(audiogram, where="key 'audiogram'")
    label = obj.get("haaqi_score") if read_labels else None
    if label is None:
        if require_label:
            raise ValueError("missing key 'haaqi_score' (a label is required)")
    else:
        label = check_label(label)
    components = obj.get("haaqi_components") if read_labels else None
    if components is not None:
        components = _check_components(components)
    texts = {}
    for key in _OPTIONAL_TEXT_KEYS:
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"key {key!r} must be a string, got {value!r}")
        texts[key] = value
    channel = obj.get("channel")
    if channel is not None and channel not in CHANNELS:
        raise ValueError(f"key 'channel' must be one of {CHANNELS}, got {channel!r}")
    group = obj.get("group")
    if group is not None and (isinstance(group, bool) or not isinstance(group, (str, int))):
        raise ValueError(f"key 'group' must be a string or an integer, got {group!r}")
    if check_files:
        _check_file(file_path, "file_path")
        if reference is not None:
            _check_file(reference, "reference")
    return ManifestRow(id=str(row_id), file_path=file_path, audiogram=levels, haaqi_score=label,
                       reference=reference, line=line, haaqi_components=components,
                       channel=channel, group=None if group is None else str(group), **texts)


def _entries(path: Path, text: str) -> list[tuple[int, Any, str | None]]:
    """(line, decoded object or None, JSON error or None) for every entry of the file."""
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None  # several objects, one per line: JSON Lines
        if isinstance(doc, list) or (isinstance(doc, dict) and isinstance(doc.get("data"), list)):
            items = doc if isinstance(doc, list) else doc["data"]
            return [(i + 1, item, None) for i, item in enumerate(items)]
        if isinstance(doc, dict) and "data" in doc:
            raise ValueError(f"{path}: key 'data' must be a list of rows")
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            out.append((number, json.loads(raw), None))
        except json.JSONDecodeError as err:
            out.append((number, None, f"bad JSON ({err.msg} at column {err.colno})"))
    return out


def read_manifest(path: str | os.PathLike, *, require_label: bool = False,
                  check_files: bool = False,
                  on_error: Literal["raise", "skip"] = "raise",
                  progress: bool = True, read_labels: bool = True) -> Manifest:
    """Reads and validates a manifest (JSON Lines, or the authors' {"data": [...]} JSON).

    Args:
      path: the manifest file. Relative clip paths resolve against its folder.
      require_label: refuse rows without `haaqi_score` (training, evaluation).
      check_files: check that every `file_path` (and `reference`) exists and that libsndfile
        can read its header, so a training run fails here rather than mid-epoch.
      on_error: "raise" stops at the first bad row; "skip" drops bad rows and records them.
      progress: a bar while the files of a large manifest (> 200 rows) are checked.
      read_labels: False ignores haaqi_score and haaqi_components (left None, not checked):
        for prediction, which never reads them.

    Returns:
      A `Manifest` (a list of ManifestRow in file order) whose `.skipped` holds
      ((line, reason), ...) for the dropped rows.

    Raises:
      FileNotFoundError: the manifest does not exist.
      ValueError: "<file>:<line> (id <id>): <reason naming the key>" for the first bad row
        (bad JSON, missing key, audiogram count or range, label outside [0, 1] or NaN, missing
        label, duplicate id, missing or unreadable audio file), or an empty manifest.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise ValueError(f"manifest {path} is a folder; pass the manifest file (.jsonl)")
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    if path.suffix.lower() == ".csv":
        raise ValueError(f"manifest {path}: a CSV file; this manifest is JSON Lines (one JSON "
                         f"object per row) or the authors' {{\"data\": [...]}} JSON. A CSV of "
                         f"reference/processed pairs is `haaqi-jax label`'s input: its "
                         f"--manifest-out writes this manifest")
    base = path.parent
    rows: list[ManifestRow] = []
    skipped: list[tuple[int, str]] = []
    skipped_ids: list[str] = []
    seen: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")          # a BOM (Excel's CSV) is fine
    except UnicodeDecodeError as err:
        raise ValueError(f"manifest {path} is not UTF-8 text (byte {err.start}): is it a "
                         f"JSONL or CSV file?") from None
    entries = _entries(path, text)
    bar = None
    if check_files and progress and len(entries) > 200:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(entries), desc=f"checking {path.name}", unit="row")
    for line, obj, json_error in entries:
        row_id = obj.get("id", line) if isinstance(obj, Mapping) else line
        try:
            if json_error is not None:
                raise ValueError(json_error)
            row = _parse_row(obj, line=line, base=base, require_label=require_label,
                             check_files=check_files, read_labels=read_labels)
            if row.id in seen:
                raise ValueError(f"key 'id': duplicate id, first used on line {seen[row.id]}")
        except ValueError as err:
            reason = f"{path}:{line} (id {str(row_id)!r}): {err}"
            if on_error == "raise":
                raise ValueError(reason) from None
            skipped.append((line, reason))
            skipped_ids.append(str(row_id))
        else:
            seen[row.id] = line
            rows.append(row)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    if not rows:
        raise ValueError(f"{path}: no usable rows" + (
            f" ({len(skipped)} skipped; the first: {skipped[0][1]})" if skipped else ""))
    return Manifest(rows, path=path, skipped=skipped, skipped_ids=skipped_ids)


def write_manifest(path: str | os.PathLike,
                   rows_or_dicts: Iterable[ManifestRow | Mapping[str, Any]]) -> Path:
    """Writes rows as JSON Lines, atomically (temporary file, then rename).

    ManifestRow paths inside the manifest's folder are written relative to it, so the folder
    can be moved; dicts are written as given (after a JSON round-trip check).

    Returns:
      The absolute path written.
    """
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, item in enumerate(rows_or_dicts):
        obj = item.to_dict(relative_to=path.parent) if isinstance(item, ManifestRow) else dict(item)
        try:
            lines.append(json.dumps(obj, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: row {i} (id {obj.get('id')!r}) cannot be written as JSON: "
                             f"{err}") from None
    return write_atomic(path, "\n".join(lines) + ("\n" if lines else ""))


def split_rows(rows: Sequence[ManifestRow], *, valid_fraction: float = 0.2,
               seed: int = 0) -> dict[str, list[ManifestRow]]:
    """Groups rows into splits.

    A row with a `split` goes to that split. Rows without one are divided at random (seeded,
    independent of file order only through `seed`) into "train" and "valid", the latter
    holding round(valid_fraction * count) of them (at least 1 when there are 2 or more and
    valid_fraction > 0), as in the authors' 80/20 split. Rows that share a `group` count as
    one unit and go together, so the two ears of one clip never sit on both sides; rows
    without a group are units of their own (a manifest without groups splits as before
    groups existed). Every list keeps manifest order.

    Returns:
      {split name: [ManifestRow, ...]}; "train" and "valid" appear only when non-empty.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    out: dict[str, list[ManifestRow]] = {}
    units: dict[Any, list[int]] = {}          # unit key -> row positions, first-seen order
    for i, row in enumerate(rows):
        if row.split is None:
            units.setdefault(("row", i) if row.group is None else ("group", row.group),
                             []).append(i)
    members = list(units.values())
    n_valid = int(round(valid_fraction * len(members)))
    if valid_fraction > 0 and len(members) >= 2:
        n_valid = max(n_valid, 1)
    chosen = np.random.default_rng(seed).permutation(len(members))[:n_valid]
    valid_positions = {i for unit in chosen for i in members[unit]}
    for i, row in enumerate(rows):
        name = row.split if row.split is not None else (
            "valid" if i in valid_positions else "train")
        out.setdefault(name, []).append(row)
    return out


#: The split that `hold_out_distortions` fills.
HELD_OUT_SPLIT = "held_out"


def distortion_stages(distortion: str) -> tuple[str, ...]:
    """The stages of a "+"-joined distortion chain ("babble+tilt_down" -> two stages)."""
    return tuple(s.strip() for s in distortion.split("+") if s.strip())


def hold_out_distortions(splits: Mapping[str, Sequence[ManifestRow]], stages: Iterable[str], *,
                         from_splits: Sequence[str] = ("train", "valid")
                         ) -> dict[str, list[ManifestRow]]:
    """Leave-distortion-out: a validation split of distortion types the model never trains on.

    Every row of `from_splits` whose distortion chain contains one of `stages` moves to the
    split `HELD_OUT_SPLIT` (in the order of `from_splits`, each split's order kept); other
    splits are untouched. Scores on that split rank models by how they generalise to unseen
    distortion types without looking at a test split (the demo's test_unseen, for one, holds
    types that valid never shows).

    Args:
      splits: {split name: rows}, e.g. from `split_rows`.
      stages: distortion stage names, e.g. ("resonance", "tilt_up").
      from_splits: the splits that lose their held-out rows.

    Returns:
      A new {split name: rows} with HELD_OUT_SPLIT added.

    Raises:
      ValueError: no stages; a stage that no row of `from_splits` has (a typo would otherwise
        hold out nothing); a row of `from_splits` without a `distortion`; a split already
        named HELD_OUT_SPLIT.
    """
    held = tuple(dict.fromkeys(str(s) for s in stages))
    if not held:
        raise ValueError("hold_out_distortions: no stages given")
    if HELD_OUT_SPLIT in splits:
        raise ValueError(f"hold_out_distortions: the manifest already has a split named "
                         f"{HELD_OUT_SPLIT!r}")
    out = {name: list(rows) for name, rows in splits.items()}
    moved: list[ManifestRow] = []
    present: set[str] = set()
    for name in from_splits:
        keep = []
        for row in out.get(name, []):
            if row.distortion is None:
                raise ValueError(f"row {row.id!r} (line {row.line}, split {name!r}) has no "
                                 f"'distortion': holding out distortion types needs every "
                                 f"row of splits {list(from_splits)} to name its distortion")
            row_stages = distortion_stages(row.distortion)
            present.update(row_stages)
            (moved if any(s in held for s in row_stages) else keep).append(row)
        out[name] = keep
    missing = [s for s in held if s not in present]
    if missing:
        raise ValueError(f"hold-out stage(s) {missing} occur in no row of splits "
                         f"{list(from_splits)}; stages present: {sorted(present)}")
    out[HELD_OUT_SPLIT] = moved
    return out
