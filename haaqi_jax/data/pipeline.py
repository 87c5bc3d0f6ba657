"""Training and evaluation batches of waveforms, built with grain.

Dataflow (one grain MapDataset, elements are whole batches):

    permutation of the rows for epoch e              numpy Generator seeded by (seed, e)
    -> batch plan of epoch e                        length grouping, see below
    MapDataset.range(first_step, last_step)          global step g = epoch * steps_per_epoch + step
      .map(load batch g) .to_iter_dataset(threads)  prefetch in `cfg.prefetch` threads

Length grouping: each epoch's permuted rows are cut into pools of `bucket_pool` batches; inside
a pool rows are sorted by bucketed length and cut into batches, and the batches of the epoch are
then shuffled, so a batch holds clips of similar length while the order stays random. Only the
last batch of an epoch can be short: it holds the n % batch_size rows left over after the full
batches and is padded with filler items (weight 0), or dropped when `drop_remainder`.

Shapes: the waveform axis N of a batch is `haaqi_jax.data.buckets.bucket_length(longest clip
in the global batch)`, a geometric ladder, so a dataset of mixed lengths compiles only a few
shapes (every host of a multi-host run pads to the same N).

Exact resume: a batch depends only on (seed, epoch, step) and the rows, never on timing or
threads. `BatchIterator.get_state()` returns the position of the next batch the caller will
receive (not what the prefetch threads have read ahead) as a small JSON-able dict;
`set_state(state)` (or `make_train_iterator(..., epoch_start=e)` for a whole epoch) continues
with exactly the batches an uninterrupted run would have produced.

Crops (`crop_seconds`): training takes one random window of that length per clip and epoch,
drawn from (seed, epoch, row position) so it is reproducible; evaluation takes the centre
window. Clips shorter than the window are used whole (and padded).

Bad items: training and evaluation fail fast. A file that cannot be read, holds NaN/inf or
silence, or is shorter than one BEATs patch raises ValueError naming the row (line, id, file).
Lengths are read from the file headers when the iterator is built, so missing files and
too-short clips fail before the first step; validate with read_manifest(check_files=True) to
catch corrupt files up front as well.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from haaqi_jax.data.audio import MIN_SAMPLES, audio_num_samples, check_waveform, load_audio
from haaqi_jax.data.buckets import bucket_length
from haaqi_jax.data.manifest import ManifestRow

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """How rows become batches.

    Attributes:
      batch_size: items per batch (global batch; the trainer shards it).
      shuffle: reshuffle rows every epoch (training). Evaluation never shuffles.
      seed: seeds the per-epoch permutation, the batch order and the random crops.
      crop_seconds: None = whole clips; else random crops of this length in training and
        the centre crop in evaluation.
      sample_rate: rate the audio is resampled to.
      drop_remainder: training only: drop the short last batch of each epoch instead of
        padding it with weight-0 fillers. Evaluation always pads.
      prefetch: batches read ahead by that many threads (0 = read in the caller's thread).
      bucket_pool: batches per pool sorted by length (1 = no length grouping).
      shard_index, shard_count: multi-host data parallelism (jax.process_index(),
        jax.process_count()). Every host plans the same global batches of `batch_size` and
        yields only its slice of `local_batch_size` items, with the same padded length.
    """

    batch_size: int = 8
    shuffle: bool = True
    seed: int = 0
    crop_seconds: float | None = None
    sample_rate: int = 16000
    drop_remainder: bool = False
    prefetch: int = 2
    bucket_pool: int = 16
    shard_index: int = 0
    shard_count: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"InputConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.shard_count < 1 or not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"InputConfig.shard_index={self.shard_index} must be in "
                             f"[0, shard_count={self.shard_count})")
        if self.batch_size % self.shard_count:
            raise ValueError(f"InputConfig.batch_size={self.batch_size} (global) must divide "
                             f"by shard_count={self.shard_count} (hosts)")
        if self.prefetch < 0:
            raise ValueError(f"InputConfig.prefetch must be >= 0, got {self.prefetch}")
        if self.bucket_pool < 1:
            raise ValueError(f"InputConfig.bucket_pool must be >= 1, got {self.bucket_pool}")
        if self.sample_rate <= 0:
            raise ValueError(f"InputConfig.sample_rate must be positive, got {self.sample_rate}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"InputConfig.seed must be in [0, 2**32), got {self.seed}")
        if self.crop_seconds is not None and self.crop_samples < MIN_SAMPLES:
            raise ValueError(f"InputConfig.crop_seconds={self.crop_seconds} gives fewer than "
                             f"{MIN_SAMPLES} samples (one BEATs patch)")

    @property
    def local_batch_size(self) -> int:
        """Items per batch on this host."""
        return self.batch_size // self.shard_count

    @property
    def crop_samples(self) -> int | None:
        if self.crop_seconds is None:
            return None
        return int(round(self.crop_seconds * self.sample_rate))


# --------------------------------------------------------------------------------- the engine

def _digest(*parts: Any) -> str:
    h = hashlib.sha1()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class _Plan:
    """Which item positions form each batch of each epoch (pure function of seed, epoch)."""

    def __init__(self, sort_keys: np.ndarray, cfg: InputConfig, *, train: bool):
        self.n = int(sort_keys.shape[0])
        self.cfg = cfg
        self.train = train
        self.sort_keys = sort_keys  # (n, 2) int64: (bucket, length)
        b = cfg.batch_size
        if train:
            self.steps_per_epoch = self.n // b if cfg.drop_remainder else -(-self.n // b)
        else:
            self.steps_per_epoch = -(-self.n // b)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.n} rows make no batch of {b} with drop_remainder=True")
        self._cache: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def _sort(self, positions: np.ndarray) -> np.ndarray:
        keys = self.sort_keys[positions]
        return positions[np.lexsort((keys[:, 1], keys[:, 0]))]  # stable

    def _build(self, epoch: int) -> list[np.ndarray]:
        b, cfg = self.cfg.batch_size, self.cfg
        if not self.train:
            order = self._sort(np.arange(self.n)) if cfg.bucket_pool > 1 else np.arange(self.n)
            return [order[i:i + b] for i in range(0, self.n, b)]
        if cfg.shuffle:
            # numpy rather than grain's index_shuffle: the latter costs ~10 ms per element for
            # small datasets (cycle walking), and a whole-epoch permutation is needed anyway.
            order = np.random.default_rng([cfg.seed, epoch, 0]).permutation(self.n)
        else:
            order = np.arange(self.n)
        n_full = (self.n // b) * b
        batches: list[np.ndarray] = []
        pool = b * cfg.bucket_pool
        for start in range(0, n_full, pool):
            chunk = order[start:min(start + pool, n_full)]
            if cfg.bucket_pool > 1:
                chunk = self._sort(chunk)
            batches.extend(chunk.reshape(-1, b))
        if cfg.shuffle and cfg.bucket_pool > 1:
            rng = np.random.default_rng([cfg.seed, epoch, 1])
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if n_full < self.n and not cfg.drop_remainder:
            batches.append(order[n_full:])
        return batches

    def batch(self, epoch: int, step: int) -> np.ndarray:
        with self._lock:
            plan = self._cache.get(epoch)
        if plan is None:
            plan = self._build(epoch)
            with self._lock:
                self._cache[epoch] = plan
                for old in [e for e in self._cache if e < epoch - 1]:
                    del self._cache[old]
        return plan[step]


class BatchIterator(Iterator[Batch]):
    """Iterator over batches with an exact, saveable position.

    Attributes:
      steps_per_epoch: batches per epoch.
      position: (epoch, step) of the next batch `next()` returns.

    get_state() -> {"epoch", "step", "steps_per_epoch", "digest"} (JSON-able);
    set_state(state) continues from that position; the digest (rows, lengths, batch config)
    must match or a ValueError says the state belongs to another dataset or config.
    """

    def __init__(self, plan: _Plan, load_batch: Callable[[np.ndarray, int], Batch], *,
                 epoch_start: int, num_epochs: int | None, digest: str):
        if epoch_start < 0:
            raise ValueError(f"epoch_start must be >= 0, got {epoch_start}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        self._plan = plan
        self._load_batch = load_batch
        self.steps_per_epoch = plan.steps_per_epoch
        self._digest = digest
        self._first = epoch_start * self.steps_per_epoch
        self._stop = (sys.maxsize if num_epochs is None
                      else (epoch_start + num_epochs) * self.steps_per_epoch)
        self._next = self._first
        self._iter = None

    def _load(self, g: int) -> Batch:
        epoch, step = divmod(g, self.steps_per_epoch)
        return self._load_batch(self._plan.batch(epoch, step), epoch)

    def _open(self) -> None:
        import grain
        self.close()
        threads = self._plan.cfg.prefetch
        ds = grain.MapDataset.range(self._next, self._stop).map(self._load)
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)
        self._iter = iter(ds.to_iter_dataset(options))

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Batch:
        if self._next >= self._stop:
            self.close()
            raise StopIteration
        if self._iter is None:
            self._open()
        batch = next(self._iter)
        self._next += 1
        return batch

    def __len__(self) -> int:
        """Batches from the start position to the end (finite iterators only)."""
        if self._stop == sys.maxsize:
            raise TypeError("an endless training iterator has no length; use steps_per_epoch")
        return self._stop - self._first

    @property
    def position(self) -> tuple[int, int]:
        epoch, step = divmod(self._next, self.steps_per_epoch)
        return int(epoch), int(step)

    def get_state(self) -> dict[str, Any]:
        epoch, step = self.position
        return {"epoch": epoch, "step": step, "steps_per_epoch": self.steps_per_epoch,
                "digest": self._digest}

    def set_state(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "step", "digest"} - set(state)
        if missing:
            raise ValueError(f"iterator state lacks key(s) {sorted(missing)}")
        if state["digest"] != self._digest:
            raise ValueError("iterator state was saved for other rows or another batch config "
                             f"(digest {state['digest']!r}, this iterator {self._digest!r})")
        g = int(state["epoch"]) * self.steps_per_epoch + int(state["step"])
        if not 0 <= int(state["step"]) < self.steps_per_epoch or g > self._stop:
            raise ValueError(f"iterator state {state} is outside this iterator's range")
        self.close()
        self._next = g

    def close(self) -> None:
        if self._iter is not None:
            close = getattr(self._iter, "close", None)
            if close is not None:
                close()
            self._iter = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def make_batch_iterator(sort_keys: np.ndarray, load_batch: Callable[[np.ndarray, int], Batch],
                        cfg: InputConfig, *, train: bool, epoch_start: int = 0,
                        num_epochs: int | None = None, digest_parts: Sequence[Any] = ()
                        ) -> BatchIterator:
    """The shared engine (waveforms here, cached features in cache.py).

    Args:
      sort_keys: (n, 2) ints per item, (bucket, length), used for length grouping.
      load_batch: (row positions (b,) of a global batch, b <= batch_size, epoch) -> this
        host's batch dict of local_batch_size items (see local_slots).
      cfg: the InputConfig.
      train: endless (or num_epochs), reshuffled per epoch; else one pass sorted by length.
      epoch_start, num_epochs: the first epoch, and how many (None = endless; eval: 1).
      digest_parts: whatever identifies the data, folded into the state digest.
    """
    sort_keys = np.asarray(sort_keys, dtype=np.int64).reshape(-1, 2)
    plan = _Plan(sort_keys, cfg, train=train)
    if not train:
        epoch_start, num_epochs = 0, 1
    digest = _digest(train, cfg.batch_size, cfg.shard_count, cfg.shuffle, cfg.seed,
                     cfg.crop_seconds,
                     cfg.sample_rate, cfg.drop_remainder if train else False, cfg.bucket_pool,
                     sort_keys.tobytes(), *digest_parts)
    return BatchIterator(plan, load_batch, epoch_start=epoch_start, num_epochs=num_epochs,
                         digest=digest)


# ------------------------------------------------------------------------------ batch helpers

def local_slots(positions: np.ndarray, cfg: InputConfig) -> tuple[np.ndarray, np.ndarray]:
    """This host's slots of a global batch.

    Args:
      positions: (b,) row positions of the global batch, b <= cfg.batch_size; slots past b
        are fillers.

    Returns:
      (rows (local_batch_size,) int: the row each slot reads, fillers repeating positions[0]
      so that every slot holds real numbers and valid positions (an all-padding slot could
      give NaN in masked softmaxes even at weight 0); real (local_batch_size,) bool).
    """
    local = cfg.local_batch_size
    slots = np.arange(cfg.shard_index * local, (cfg.shard_index + 1) * local)
    real = slots < len(positions)
    return np.where(real, positions[np.minimum(slots, len(positions) - 1)],
                    positions[0]).astype(np.int64), real


def row_fields(rows: Sequence[ManifestRow], slots: np.ndarray, real: np.ndarray) -> Batch:
    """audiogram (B,8) f32, label (B,) f32, components (B, 2) f32, weight (B,) f32, index (B,)
    int32 for the slots.

    components: HAAQI's (nonlinear, linear) parts of the label, 0 where a row has none (a loss
    that uses them checks the rows first: `losses.required_row_fields`). Fillers (real False)
    get label and components 0, weight 0 and index -1.
    """
    audiogram = np.stack([rows[i].audiogram for i in slots]).astype(np.float32)
    label = np.array([rows[i].haaqi_score or 0.0 for i in slots], np.float32) * real
    components = np.array([rows[i].haaqi_components or (0.0, 0.0) for i in slots],
                          np.float32).reshape(len(slots), 2) * real[:, None]
    return {"audiogram": audiogram, "label": label.astype(np.float32),
            "components": components.astype(np.float32), "weight": real.astype(np.float32),
            "index": np.where(real, slots, -1).astype(np.int32)}


def pad_stack(items: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Stacks (n_i, ...) arrays into (len(items), length, ...), zero padded.

    Returns:
      (stacked, valid (len(items), length) bool True where a slot holds data).
    """
    first = np.asarray(items[0])
    out = np.zeros((len(items), length) + first.shape[1:], dtype=first.dtype)
    valid = np.zeros((len(items), length), dtype=bool)
    for slot, item in enumerate(items):
        out[slot, :item.shape[0]] = item
        valid[slot, :item.shape[0]] = True
    return out, valid


# ------------------------------------------------------------------------------- waveforms

def _check_rows(rows: Sequence[ManifestRow], *, require_label: bool) -> None:
    if len(rows) == 0:
        raise ValueError("no rows to make batches from")
    if require_label:
        for row in rows:
            if row.haaqi_score is None:
                raise ValueError(f"{row.describe()} has no haaqi_score; training needs labels "
                                 "(read the manifest with require_label=True)")


def _probe_lengths(rows: Sequence[ManifestRow], sample_rate: int) -> np.ndarray:
    from tqdm.auto import tqdm
    lengths = np.empty(len(rows), np.int64)
    for i, row in enumerate(tqdm(rows, desc="reading clip lengths", unit="clip",
                                 disable=len(rows) < 500, leave=False)):
        try:
            lengths[i] = audio_num_samples(row.file_path, sample_rate)
        except (OSError, ValueError) as err:
            raise ValueError(f"{row.describe()}: {err}") from None
        if lengths[i] < MIN_SAMPLES:
            raise ValueError(f"{row.describe()}: {lengths[i]} samples at {sample_rate} Hz is "
                             f"shorter than one BEATs patch ({MIN_SAMPLES})")
    return lengths


def _crop_start(n: int, crop: int, *, train: bool, seed: int, epoch: int, position: int) -> int:
    if n <= crop:
        return 0
    if not train:
        return (n - crop) // 2
    return int(np.random.default_rng([seed, epoch, position, 2]).integers(0, n - crop + 1))


def _waveform_iterator(rows: Sequence[ManifestRow], cfg: InputConfig, *, train: bool,
                       epoch_start: int, num_epochs: int | None) -> BatchIterator:
    _check_rows(rows, require_label=train)
    lengths = _probe_lengths(rows, cfg.sample_rate)
    crop = cfg.crop_samples
    effective = np.minimum(lengths, crop) if crop is not None else lengths
    buckets = np.array([bucket_length(n) for n in effective], np.int64)

    def load_batch(positions: np.ndarray, epoch: int) -> Batch:
        # Every host pads to the same length: the bucket of the global batch's longest clip.
        length = bucket_length(int(effective[positions].max()))
        slots, real = local_slots(positions, cfg)
        waves = []
        for i in slots:
            row = rows[i]
            try:
                wave = check_waveform(load_audio(row.file_path, cfg.sample_rate, row.channel),
                                      name=str(row.file_path))
            except (OSError, ValueError) as err:
                raise ValueError(f"{row.describe()}: {err}") from None
            if crop is not None:
                start = _crop_start(wave.shape[0], crop, train=train, seed=cfg.seed,
                                    epoch=epoch, position=int(i))
                wave = wave[start:start + crop]
            if wave.shape[0] > length:
                raise ValueError(f"{row.describe()}: decoded {wave.shape[0]} samples, more than "
                                 f"the {lengths[i]} its header announced")
            waves.append(wave)
        waveform, valid = pad_stack(waves, length)
        return {"waveform": waveform, "padding_mask": ~valid, **row_fields(rows, slots, real)}

    ids = tuple(row.id for row in rows)
    return make_batch_iterator(np.stack([buckets, effective], axis=1), load_batch, cfg,
                               train=train, epoch_start=epoch_start, num_epochs=num_epochs,
                               digest_parts=("waveform", ids))


def make_train_iterator(rows: Sequence[ManifestRow], cfg: InputConfig, *, epoch_start: int = 0,
                        num_epochs: int | None = None) -> BatchIterator:
    """Training batches, epoch after epoch (endless unless `num_epochs`).

    Every row appears once per epoch (the last batch padded with weight-0 fillers unless
    cfg.drop_remainder). See the module docstring for ordering, crops and resume.

    Args:
      rows: labelled ManifestRows (ValueError names the first row without a label).
      cfg: InputConfig.
      epoch_start: first epoch (its order is the same as in an uninterrupted run).
      num_epochs: stop after this many epochs; None = endless.

    Returns:
      BatchIterator yielding {waveform (B,N) f32, padding_mask (B,N) bool True=pad,
      audiogram (B,8) f32, label (B,) f32, weight (B,) f32, index (B,) int32 (-1 = filler)}.
    """
    return _waveform_iterator(rows, cfg, train=True, epoch_start=epoch_start,
                              num_epochs=num_epochs)


def make_eval_batches(rows: Sequence[ManifestRow], cfg: InputConfig) -> BatchIterator:
    """One pass over every row in fixed batches (sorted by length; `index` maps back).

    cfg.shuffle and cfg.drop_remainder are ignored; the last batch is padded with weight-0
    fillers. Rows without a label get label 0 (weight stays 1: it marks real items).
    """
    return _waveform_iterator(rows, cfg, train=False, epoch_start=0, num_epochs=1)
