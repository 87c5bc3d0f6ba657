"""A feature cache: run the frozen encoder once per clip, then train the head from disk.

Layout of `cache_dir/<key>/` (key = hash of the encoder fingerprint, layers, dtype, rate):
  meta.json     fingerprint, layers, dtype, sample_rate, feature shape
  index.jsonl   one line per stored clip, appended as clips finish (the last line per id and
                source wins):
                id, source (path|size|mtime_ns of the audio), file, n_samples, t_valid, t_full
  <sha1(id|source)>.npy  the clip's valid tokens: (t_valid, C) or (L, t_valid, C); rows of one
                id from other audio files (two demo folders) get files of their own

Each clip is encoded padded to `bucket_length(its own length)`, alone or in a batch of clips
with that same padded length, so its features do not depend on which clips it was batched with
(masked keys, zeroed padded tokens). Only the valid tokens (a prefix, checked) are stored;
`t_full` (tokens of the padded input) is kept so that feature batches have the same few T
values as the waveform buckets.

Storage dtype: float16 by default. Head-only training is I/O bound and BEATs hidden states are
LayerNorm outputs of modest range, so float16 halves disk and read time (13 layers x 768 x 1496
tokens of a 30 s clip: 30 MB instead of 60 MB) at a relative rounding of 2**-11, far below
label noise. Values beyond float16 range raise a ValueError naming the clip. Pass
dtype="float32" for bit-exact features.

Staleness: the cache folder is keyed by an encoder fingerprint (train.py and distillation pass
`params_fingerprint(params, config)` and `probe=True`; without a fingerprint, the probe alone).
The probe, a hash of the encoder's output on a fixed signal, sees a change of the encoder's code
that its weights and settings do not; it costs one extra encode_fn call and is bit-exact, so
another device or backend rebuilds. A clip is
re-encoded when its audio file's size or modification time changed. Interrupted builds resume:
clips already in index.jsonl with their .npy present and whole are skipped (a file cut short is
encoded again). Several runs may share a cache folder: every file is written atomically under a
name of its own.

Two readers: `make_feature_batches` (the encoder's features INSTEAD of the waveforms: head-only
training) and `add_cached_targets` (waveform batches WITH the cached outputs of a frozen
encoder added, e.g. a distillation teacher's target layers, so the teacher never runs in the
training step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np

from haaqi_jax.data.audio import audio_num_samples, check_waveform, load_audio
from haaqi_jax.data.buckets import bucket_length
from haaqi_jax.data.manifest import ManifestRow
from haaqi_jax.data.pipeline import (Batch, BatchIterator, InputConfig, local_slots,
                                     make_batch_iterator, pad_stack, row_fields)
from haaqi_jax.files import read_json, write_atomic

EncodeFn = Callable[[np.ndarray, np.ndarray], tuple[Any, Any]]
META_FILE = "meta.json"
INDEX_FILE = "index.jsonl"
_FLOAT16_MAX = float(np.finfo(np.float16).max)


#: Feature/target storage dtypes: float16 halves the cache, float32 keeps it bit-exact.
STORAGE_DTYPES = ("float16", "float32")


def params_fingerprint(params: Any, config: Any = None) -> str:
    """Hex digest of a parameter pytree (paths, shapes, dtypes, values) and a JSON-able config."""
    import jax  # only for tree flattening; params are usually jax arrays anyway
    h = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in leaves:
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}".encode())
        h.update(arr.tobytes())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def source_id(path: Path, channel: str | None = None) -> str:
    """What a result computed from an audio file depends on: the file as it is now (path,
    size, modification time) and the channel read. OSError when the file cannot be stat'ed."""
    stat = path.stat()
    channel = "" if channel is None else f"|{channel}"
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}{channel}"


def _source_id(row: ManifestRow) -> str:
    """What the stored features were computed from: the file as it was, and the channel."""
    return source_id(row.file_path, row.channel)


def _file_name(row_id: str, source: str) -> str:
    """One file per clip *and* audio: two datasets whose rows share an id (demo000000 of two
    demo folders) or a clip re-encoded after its audio changed never write over features that
    another run may still be reading."""
    return hashlib.sha1(f"{row_id}|{source}".encode()).hexdigest()[:24] + ".npy"


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """Where one clip's features are and their token counts."""
    id: str
    source: str
    file: str
    n_samples: int
    t_valid: int
    t_full: int


class FeatureCache:
    """Read access to a built cache folder (see the module docstring).

    Attributes:
      directory, fingerprint, layers ("last"/"all"), dtype, sample_rate,
      feature_shape ((C,) or (L, C)), entries ({(row id, source): CacheEntry}: rows of one id
      from other audio, e.g. two demo folders sharing the cache, are stored side by side).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.directory} is not a feature cache ({META_FILE} "
                                    "is missing)")
        meta = read_json(meta_path, "a feature cache's record")
        self.fingerprint = meta["fingerprint"]
        self.layers = meta["layers"]
        self.dtype = meta["dtype"]
        self.sample_rate = int(meta["sample_rate"])
        shape = meta.get("feature_shape")
        self.feature_shape = None if shape is None else tuple(shape)
        self.entries = self._read_index()

    def _read_index(self) -> dict[tuple[str, str], CacheEntry]:
        entries: dict[tuple[str, str], CacheEntry] = {}
        path = self.directory / INDEX_FILE
        if not path.is_file():
            return entries
        for line in path.read_text().splitlines():
            try:
                entry = CacheEntry(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue  # a line cut short by an interrupted build
            if (self.directory / entry.file).is_file():
                entries[entry.id, entry.source] = entry
        return entries

    def __len__(self) -> int:
        return len(self.entries)

    def _lookup(self, row: ManifestRow) -> CacheEntry | None:
        if not row.file_path.is_file():
            return None
        return self.entries.get((row.id, _source_id(row)))

    def older_versions(self, row: ManifestRow) -> list[CacheEntry]:
        """Entries of this row's id, file and channel stored from an earlier version of the
        audio (another size or modification time): no run can want them any more."""
        source = _source_id(row)
        same_file = lambda s: (s.split("|")[0], s.split("|")[3:]) == (
            source.split("|")[0], source.split("|")[3:])
        return [e for (row_id, s), e in self.entries.items()
                if row_id == row.id and s != source and same_file(s)]

    def is_current(self, row: ManifestRow) -> bool:
        """True when the row's clip is stored for its audio file as it is now."""
        return self._lookup(row) is not None

    def entry(self, row: ManifestRow) -> CacheEntry:
        entry = self._lookup(row)
        if entry is None:
            raise ValueError(f"{row.describe()} is not in the feature cache {self.directory} "
                             "(or its audio changed): run build_feature_cache on these rows")
        return entry

    def intact(self, row: ManifestRow) -> bool:
        """True when the row's clip is stored for its audio as it is now (`is_current`) and its
        file reads as the index says (header and size: a file cut short by a crash or a full
        disk is not); reads the header only."""
        entry = self._lookup(row)
        if entry is None:
            return False
        try:
            stored = np.load(self.directory / entry.file, mmap_mode="r")
        except (OSError, ValueError, EOFError):                  # EOFError: an empty file
            return False
        return self._shape_problem(entry, stored.shape) is None

    def _shape_problem(self, entry: CacheEntry, shape: tuple[int, ...]) -> str | None:
        want = (None if self.feature_shape is None else
                self.feature_shape[:-1] + (entry.t_valid, self.feature_shape[-1]))
        if want is not None and tuple(shape) != want:
            return f"holds shape {tuple(shape)}, the index says {want}"
        return None

    def load(self, row: ManifestRow, dtype: Any = np.float32) -> np.ndarray:
        """The stored features as `dtype` (None = as stored): (t_valid, C) or (L, t_valid, C).

        Raises:
          ValueError naming the clip and its file when the file is unreadable or not the shape
          the index records (a rerun of the cache build re-encodes such clips).
        """
        entry = self.entry(row)
        path = self.directory / entry.file
        try:
            stored = np.load(path)
            problem = self._shape_problem(entry, stored.shape)
        except (OSError, ValueError, EOFError) as err:
            problem = f"cannot be read ({type(err).__name__}: {err})"
        if problem is not None:
            raise ValueError(f"{row.describe()}: its cached features {path} {problem}; the "
                             f"file is damaged: rerun, and the cache build encodes it again")
        return stored if dtype is None else stored.astype(dtype)


def probe_fingerprint(encode_fn: EncodeFn, sample_rate: int = 16000) -> str:
    """Hex digest of `encode_fn`'s output on a fixed probe signal (one bucket of seeded noise):
    it changes with the encoder's code as well as its weights, which a parameter digest
    cannot see."""
    n = bucket_length(sample_rate)
    wave = (0.1 * np.random.default_rng(0).standard_normal((1, n))).astype(np.float32)
    features, token_padding_mask = encode_fn(wave, np.zeros((1, n), bool))
    h = hashlib.sha256(b"probe")
    for arr in (np.asarray(features, np.float32), np.asarray(token_padding_mask, bool)):
        h.update(repr(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:32]


def _split_outputs(features, token_padding_mask, *, batch: int, layers: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, np.float32)
    mask = np.asarray(token_padding_mask, bool)
    if features.ndim == 4 and layers == "last":
        features = features[:, -1]
    if features.ndim != (4 if layers == "all" else 3):
        raise ValueError(f"encode_fn returned features of shape {features.shape}; layers="
                         f"{layers!r} needs (B, T, C) or, for 'all', (B, L, T, C)")
    t_axis = features.ndim - 2
    if features.shape[0] != batch or mask.shape != (batch, features.shape[t_axis]):
        raise ValueError(f"encode_fn returned features {features.shape} and token mask "
                         f"{mask.shape} for a batch of {batch}: expected (B, [L,] T, C) and "
                         "(B, T)")
    return features, mask


def build_feature_cache(rows: Sequence[ManifestRow], encode_fn: EncodeFn,
                        cache_dir: str | os.PathLike, *, batch_size: int,
                        sample_rate: int = 16000, layers: Literal["last", "all"] = "last",
                        fingerprint: str | None = None,
                        dtype: Literal["float16", "float32"] = "float16",
                        probe: bool = False, progress: bool = True) -> FeatureCache:
    """Encodes every row's clip once (skipping clips already cached) and stores the features.

    Args:
      rows: ManifestRows (ids must be unique; they key the cache).
      encode_fn: (waveform (B, N) f32, padding_mask (B, N) bool True=pad) ->
        (features (B, T, C) or (B, L, T, C), token_padding_mask (B, T) True=pad). Called with
        B == batch_size always (short batches are filled with copies) and N a bucket length.
      cache_dir: parent folder; the cache lives in a sub-folder per fingerprint.
      batch_size: clips per encode_fn call.
      sample_rate: audio rate fed to encode_fn.
      layers: "last" keeps (T, C) (the last layer when encode_fn returns all); "all" keeps
        (L, T, C) and requires 4-D output.
      fingerprint: identifies the encoder's parameters and config (`params_fingerprint`);
        None = hash of encode_fn's output on a probe signal (one extra call). Recorded in
        meta.json and in the resume digest of the cache's batch iterators.
      probe: with a fingerprint, also key the folder by `probe_fingerprint(encode_fn)`, so
        that a change of the encoder's code is seen (one extra call); the recorded fingerprint
        stays the given one, so a resume on a machine whose probe differs by rounding
        re-encodes the clips but is not refused.
      progress: a bar while clips are encoded.
      dtype: storage dtype, "float16" (default, see module docstring) or "float32".

    Returns:
      The FeatureCache.

    Raises:
      ValueError naming the row for unreadable, silent or too-short audio, non-finite or
      float16-overflowing features, or a token mask whose valid tokens are not a prefix.
    """
    from tqdm.auto import tqdm

    if layers not in ("last", "all"):
        raise ValueError(f"layers must be 'last' or 'all', got {layers!r}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = [row.id for row in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"row id {dup!r} appears more than once; ids key the feature cache")
    if fingerprint is None:
        fingerprint = probe_fingerprint(encode_fn, sample_rate)
        probe = False
    code = f"|{probe_fingerprint(encode_fn, sample_rate)}" if probe else ""
    key = hashlib.sha1(f"{fingerprint}{code}|{layers}|{dtype}|{sample_rate}".encode()
                       ).hexdigest()[:16]
    directory = Path(cache_dir) / key
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        meta = {"fingerprint": fingerprint, "layers": layers, "dtype": dtype,
                "sample_rate": sample_rate, "feature_shape": None}
        write_atomic(meta_path, json.dumps(meta, indent=2))
    cache = FeatureCache(directory)

    todo = [row for row in rows if not cache.intact(row)]
    groups: dict[int, list[tuple[ManifestRow, int]]] = defaultdict(list)
    for row in todo:
        try:
            n = audio_num_samples(row.file_path, sample_rate)
        except (OSError, ValueError) as err:
            raise ValueError(f"{row.describe()}: {err}") from None
        groups[bucket_length(n)].append((row, n))

    feature_shape = cache.feature_shape
    with open(directory / INDEX_FILE, "a") as index, tqdm(
            total=len(todo), desc="encoding clips", unit="clip",
            disable=not (todo and progress)) as bar:
        for _, members in sorted(groups.items()):
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                waves = []
                for row, _ in chunk:
                    try:
                        waves.append(check_waveform(
                            load_audio(row.file_path, sample_rate, row.channel),
                            name=str(row.file_path)))
                    except (OSError, ValueError) as err:
                        raise ValueError(f"{row.describe()}: {err}") from None
                longest = max(w.shape[0] for w in waves)
                # Short batches are filled with copies of the first clip: encode_fn always sees
                # batch_size rows (one compiled shape per bucket).
                waves_full = waves + [waves[0]] * (batch_size - len(waves))
                waveform, valid = pad_stack(waves_full, bucket_length(longest))
                features, token_pad = _split_outputs(*encode_fn(waveform, ~valid),
                                                     batch=batch_size, layers=layers)
                for k, (row, _) in enumerate(chunk):
                    entry = _store(directory, row, features[k], token_pad[k], dtype,
                                   n_samples=waves[k].shape[0])
                    index.write(json.dumps(dataclasses.asdict(entry)) + "\n")
                    index.flush()
                    for stale in cache.older_versions(row):    # one file per clip on disk
                        (directory / stale.file).unlink(missing_ok=True)
                    bar.update()
                shape = (features.shape[-1],) if layers == "last" else (
                    features.shape[1], features.shape[-1])
                if feature_shape is None:
                    feature_shape = shape
                    meta = read_json(meta_path, "a feature cache's record")
                    meta["feature_shape"] = list(shape)
                    write_atomic(meta_path, json.dumps(meta, indent=2))
                elif tuple(feature_shape) != shape:
                    raise ValueError(f"encode_fn returned feature shape {shape}, but the cache "
                                     f"{directory} holds {tuple(feature_shape)}")
    return FeatureCache(directory)


def _store(directory: Path, row: ManifestRow, features: np.ndarray, token_pad: np.ndarray,
           dtype: str, *, n_samples: int) -> CacheEntry:
    """Writes one clip's valid tokens atomically; returns its index entry."""
    valid = ~token_pad
    t_valid = int(valid.sum())
    if t_valid == 0 or not valid[:t_valid].all():
        raise ValueError(f"{row.describe()}: encode_fn's token mask has {t_valid} valid tokens "
                         "that are not a leading prefix; cannot store it")
    kept = features[..., :t_valid, :]
    if not np.all(np.isfinite(kept)):
        raise ValueError(f"{row.describe()}: encode_fn returned NaN or infinite features")
    if dtype == "float16" and np.abs(kept).max() > _FLOAT16_MAX:
        raise ValueError(f"{row.describe()}: features exceed the float16 range; build the "
                         "cache with dtype='float32'")
    source = _source_id(row)
    name = _file_name(row.id, source)
    buffer = io.BytesIO()
    np.save(buffer, kept.astype(dtype))
    write_atomic(directory / name, buffer.getvalue())
    return CacheEntry(id=row.id, source=source, file=name,
                      n_samples=int(n_samples), t_valid=t_valid,
                      t_full=int(features.shape[-2]))


def make_feature_batches(cache: FeatureCache, rows: Sequence[ManifestRow], cfg: InputConfig,
                         *, train: bool = True, epoch_start: int = 0,
                         num_epochs: int | None = None) -> BatchIterator:
    """Batches of cached features with the waveform pipeline's order, filler and resume rules.

    train=True behaves as make_train_iterator (reshuffled epochs, endless unless num_epochs,
    labels required); train=False as make_eval_batches (one pass sorted by length). Length
    grouping uses (t_full, t_valid); T of a batch is the largest t_full in it, so T takes as
    few values as the waveform buckets. cfg.crop_seconds must be None (features of a crop are
    not a crop of the features).

    Returns:
      BatchIterator yielding {features (B,T,C) or (B,L,T,C) f32 (0 past t_valid),
      token_mask (B,T) bool True=valid, audiogram (B,8) f32, label (B,) f32, weight (B,) f32,
      index (B,) int32 (-1 = filler)}.
    """
    if cfg.crop_seconds is not None:
        raise ValueError("make_feature_batches: cfg.crop_seconds must be None; cached features "
                         "are whole clips")
    if cfg.sample_rate != cache.sample_rate:
        raise ValueError(f"cfg.sample_rate {cfg.sample_rate} differs from the cache's "
                         f"{cache.sample_rate}")
    if len(rows) == 0:
        raise ValueError("no rows to make batches from")
    if train:
        for row in rows:
            if row.haaqi_score is None:
                raise ValueError(f"{row.describe()} has no haaqi_score; training needs labels")
    entries = [cache.entry(row) for row in rows]
    keys = np.array([[e.t_full, e.t_valid] for e in entries], np.int64)
    all_layers = cache.layers == "all"

    def load_batch(positions: np.ndarray, epoch: int) -> Batch:
        del epoch  # no randomness per item
        t = int(keys[positions, 0].max())  # same on every host: from the global batch
        slots, real = local_slots(positions, cfg)
        feats = [cache.load(rows[i]) for i in slots]
        if all_layers:  # (L, t, C) -> (t, L, C) so the token axis comes first for padding
            feats = [np.swapaxes(f, 0, 1) for f in feats]
        features, token_mask = pad_stack(feats, t)
        if all_layers:
            features = np.ascontiguousarray(np.swapaxes(features, 1, 2))
        return {"features": features, "token_mask": token_mask,
                **row_fields(rows, slots, real)}

    digest_parts = ("features", cache.fingerprint, tuple(e.id for e in entries),
                    tuple(e.source for e in entries))
    return make_batch_iterator(keys, load_batch, cfg, train=train, epoch_start=epoch_start,
                               num_epochs=num_epochs, digest_parts=digest_parts)


class TargetBatches(Iterator[Batch]):
    """Waveform batches with each clip's cached encoder outputs added (see `add_cached_targets`).

    Position, state and resumption are the wrapped iterator's: get_state / set_state /
    steps_per_epoch / position / close are passed through, so a checkpoint taken with cached
    targets resumes exactly like one of the plain waveform pipeline.
    """

    def __init__(self, batches: Any, cache: FeatureCache, rows: Sequence[ManifestRow],
                 num_tokens: Callable[[int], int], key: str, dtype: Any):
        self._batches = batches
        self._cache = cache
        self._rows = rows
        self._num_tokens = num_tokens
        self._key = key
        self._dtype = dtype
        self.steps_per_epoch = batches.steps_per_epoch

    def __iter__(self) -> "TargetBatches":
        return self

    def __next__(self) -> Batch:
        batch = dict(next(self._batches))
        n_valid = (~np.asarray(batch["padding_mask"], bool)).sum(axis=1)
        t = int(self._num_tokens(int(batch["waveform"].shape[1])))
        index = np.asarray(batch["index"])
        shape = tuple(self._cache.feature_shape)  # (C,) or (L, C)
        dtype = np.dtype(self._cache.dtype if self._dtype is None else self._dtype)
        targets = np.zeros((len(index),) + shape[:-1] + (t, shape[-1]), dtype)
        for slot, i in enumerate(index):
            if i < 0:
                continue  # a filler (weight 0): zeros are finite and count for nothing
            row = self._rows[int(i)]
            entry = self._cache.entry(row)
            if entry.n_samples != int(n_valid[slot]):
                raise ValueError(
                    f"{row.describe()}: the batch holds {int(n_valid[slot])} samples of this "
                    f"clip but its cached targets were computed from {entry.n_samples}; cached "
                    "targets belong to whole clips (set data.crop_seconds=None)")
            expected = int(self._num_tokens(entry.n_samples))
            if entry.t_valid != expected or entry.t_valid > t:
                raise ValueError(
                    f"{row.describe()}: the cache holds {entry.t_valid} target tokens, the "
                    f"model makes {expected} of {entry.n_samples} samples ({t} in the batch); "
                    f"the cache {self._cache.directory} was built by another encoder")
            targets[slot, ..., :entry.t_valid, :] = self._cache.load(row, dtype)
        batch[self._key] = targets
        return batch

    @property
    def position(self) -> tuple[int, int]:
        return self._batches.position

    def get_state(self) -> dict[str, Any]:
        return self._batches.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._batches.set_state(state)

    def close(self) -> None:
        self._batches.close()


def add_cached_targets(batches: Any, cache: FeatureCache, rows: Sequence[ManifestRow],
                       num_tokens: Callable[[int], int], *, key: str = "targets",
                       dtype: Any = None) -> TargetBatches:
    """Adds each clip's cached encoder outputs to waveform batches, e.g. a frozen teacher's
    target layers for distillation, so that the training step never runs the teacher.

    Args:
      batches: a waveform BatchIterator (`make_train_iterator` of the same `rows`); its
        `index` entries name the rows.
      cache: a FeatureCache built (`build_feature_cache`) over those rows from whole clips,
        with the same padding rule as the model (so its valid tokens are the model's).
      rows: the rows `batches` was made from.
      num_tokens: samples -> tokens of the model (e.g. `haaqi_jax.model.tokens_for_samples`).
      key: name of the added entry.
      dtype: of the added entry; None = the cache's storage dtype (float16 halves the transfer;
        cast on the device).
    Returns:
      An iterator of the same batches plus `key`: (B, T, C) or (B, L, T, C) with T =
      num_tokens(waveform length), each clip's t_valid cached tokens first, zeros after them
      and for fillers (weight 0).
    Raises:
      ValueError naming the row when a clip is not cached or its audio changed, when the batch
      does not hold the whole clip (a crop: a target belongs to one exact input), or when the
      cache's token counts are not the model's. Rows are checked up front, clips per batch.
    """
    for row in rows:
        cache.entry(row)  # fails fast on a missing or stale clip
    if cache.feature_shape is None:
        raise ValueError(f"the cache {cache.directory} holds no clips")
    return TargetBatches(batches, cache, rows, num_tokens, key, dtype)
