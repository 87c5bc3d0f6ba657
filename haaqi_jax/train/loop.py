"""The training loop: config -> trained HAAQI-Net, metrics, checkpoints and a report.

    python train.py --config configs/default.py --workdir runs/demo --set train.num_epochs=5

`train_and_evaluate(config, workdir)`:
 1. saves the config as JSON in the workdir,
 2. builds the model (random encoder, or converted weights from `model.encoder_checkpoint`),
 3. builds the data (`data.cache=True`: the encoder runs once over every clip into a feature
    cache and only the head trains; else end-to-end on waveforms, encoder frozen or not),
 4. trains with the jitted, data-parallel step, logging scalars as JSONL (metrics.jsonl),
    evaluating the validation split every epoch (loss, LCC, SRCC, MSE), early-stopping on the
    validation quantity `train.monitor` names (the loss by default, or LCC, SRCC, MSE or a
    metric of your own: `haaqi_jax.train.metrics.register_metric`), checkpointing the latest
    state every `train.checkpoint_every_steps` and at each epoch end (the best by that
    quantity kept too),
 5. restores the best checkpoint, evaluates every split in `evaluated_splits` and writes the
    report folder (metrics per split and distortion, scatter and per-distortion plots, table,
    example predictions, best_model/ loadable with `HAAQINet.load`, curves.png: the learning
    curves, manifest.jsonl: every row of the run with the split it was trained or scored in,
    for `haaqi-jax evaluate`).

Resuming: run the same command with the same workdir. The train state (params, optimizer,
step, RNG), the data-iterator position and the early-stopping bookkeeping come back from the
latest checkpoint, so the continued run is bit-for-bit the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from haaqi_jax import config as cfglib
from haaqi_jax import losses
from haaqi_jax.files import complete_lines, exclusive_lock, read_json, write_atomic
from haaqi_jax.train import early_stopping
from haaqi_jax.train import metrics as metrics_lib
from haaqi_jax.train import sharding
from haaqi_jax.train import state as state_lib
from haaqi_jax.train import steps as steps_lib

if TYPE_CHECKING:  # orbax is imported lazily: it is slow to import
    from haaqi_jax.train.checkpoint import TrainCheckpointManager

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
REPORT_DIR = "report"


# ----------------------------------------------------------------------------- data contract


@dataclasses.dataclass
class TrainData:
    """What the loop needs from the data side (`build_train_data` makes it from the config).

    Attributes:
      mode: "features" (batches: features, token_mask True = valid, audiogram, label, weight,
        index) or "waveform" (waveform, padding_mask True = pad, audiogram, label, weight, index).
      train: endless iterator of host batches of `global batch / process_count` items, with
        get_state() -> JSON-able and set_state(state) for exact resumption.
      steps_per_epoch: train batches per epoch.
      eval_batches: split name -> iterable of host batches covering that split once (filler
        items have weight 0; `index` = row position in `rows[split]`).
      rows: split name -> its manifest rows (for labels, ids and distortion types in reports).
    """

    mode: str
    train: Any
    steps_per_epoch: int
    eval_batches: Callable[[str], Iterable[Mapping[str, np.ndarray]]]
    rows: Mapping[str, Sequence[Any]]


BATCH_KEYS = {
    "features": ("features", "token_mask", "audiogram", "label", "components", "weight"),
    "waveform": ("waveform", "padding_mask", "audiogram", "label", "components", "weight"),
}


@dataclasses.dataclass
class TrainResult:
    """What `train_and_evaluate` returns. best_valid_loss is the validation loss of the best
    step, which `monitor` (train.monitor) chose with its value `best_value` (None: undefined,
    e.g. the LCC of constant predictions)."""

    workdir: Path
    final_step: int
    best_step: int | None
    best_valid_loss: float | None
    stopped_early: bool
    interrupted: bool
    state: Any
    report_dir: Path | None
    monitor: str = metrics_lib.LOSS
    best_value: float | None = None


# ----------------------------------------------------------------------------- model


def encoder_from_checkpoint(path: str | os.PathLike) -> tuple[str, dict[str, Any], Any]:
    """(encoder kind, encoder config dict, encoder params) of a converted BEATs directory
    (`kind: beats`) or of a HAAQI-Net directory (`kind: haaqinet`, its encoder part)."""
    from haaqi_jax.train.checkpoint import load_config, load_params

    try:
        meta = load_config(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model.encoder_checkpoint: {err}") from None
    kind = meta.get("kind")
    if kind == "beats":
        from haaqi_jax.beats import load_beats
        module, params = load_beats(path)
        cfg = module.config
        print(f"encoder: BEATs from {path} ({cfg.encoder_layers} layers x "
              f"{cfg.encoder_embed_dim}"
              + (", its fine-tuned predictor unused" if cfg.finetuned_model else "") + ")",
              file=sys.stderr)
        return "beats", cfg.to_dict(), params
    if kind == "haaqinet":
        params, meta = load_params(path)
        print(f"encoder: the encoder of the HAAQI-Net {path}", file=sys.stderr)
        return meta["config"]["encoder_kind"], dict(meta["config"]["encoder_config"]), \
            params["encoder"]
    raise ValueError(f"model.encoder_checkpoint {path}: config.json has kind {kind!r}; expected "
                     "'beats' (convert_weights.py output) or 'haaqinet'")


def build_model_config(config: Any, encoder: tuple[str, Mapping[str, Any]] | None = None):
    """HAAQINetConfig from the `model` section.

    Args:
      config: the run config.
      encoder: (kind, full encoder config) from a checkpoint; replaces model.encoder_kind and
        model.encoder_config (the checkpoint's architecture wins).
    """
    from haaqi_jax.head import HeadConfig
    from haaqi_jax.model import HAAQINetConfig, resolve_encoder_config

    m = config.model
    if encoder is not None:
        kind, enc_cfg = encoder[0], dict(encoder[1])
    else:
        kind = m.encoder_kind
        overrides = cfglib.to_dict(m.encoder_config) if m.get("encoder_config") else None
        try:
            enc_cfg = resolve_encoder_config(kind, overrides)
        except ValueError as e:
            raise ValueError(f"model.{e}") from None
    try:
        head = HeadConfig.from_dict(cfglib.to_dict(m.head)) if m.get("head") else HeadConfig()
    except (TypeError, ValueError) as e:
        raise ValueError(f"model.head: {e}") from None
    return HAAQINetConfig(encoder_kind=kind, encoder_config=enc_cfg,
                          feature_mode=m.feature_mode, feature_layers=tuple(m.feature_layers),
                          head=head, freeze_encoder=bool(m.freeze_encoder))


def build_model(config: Any):
    """HAAQINet with random weights (seed `config.seed`); with `model.encoder_checkpoint` the
    encoder (architecture and weights) comes from that converted checkpoint, with
    `model.head_checkpoint` the head's weights from that HAAQI-Net."""
    from haaqi_jax.model import HAAQINet

    if config.model.get("encoder_checkpoint"):
        kind, enc_cfg, enc_params = encoder_from_checkpoint(config.model.encoder_checkpoint)
        net_cfg = build_model_config(config, (kind, enc_cfg))
        net = HAAQINet.init_random(net_cfg, seed=int(config.seed), encoder_params=enc_params)
    else:
        net = HAAQINet.init_random(build_model_config(config), seed=int(config.seed))
    if config.model.get("head_checkpoint"):
        net = with_head_from(net, config.model.head_checkpoint)
    elif config.model.get("encoder_checkpoint") and kind_of(config.model.encoder_checkpoint) \
            == "haaqinet":
        print("head: random (model.head_checkpoint, set to the same folder, would start from "
              "that HAAQI-Net's head)", file=sys.stderr)
    return net


def kind_of(path: str | os.PathLike) -> str | None:
    """The "kind" of a parameter directory's config.json ("beats", "haaqinet", ...)."""
    from haaqi_jax.train.checkpoint import load_config
    return load_config(path).get("kind")


def with_head_from(net: Any, path: str | os.PathLike) -> Any:
    """`net` with the head weights of the HAAQI-Net directory `path` (e.g. the converted
    released model, to fine-tune it). Its head settings must equal `net`'s (dropout aside):
    the same weights under another audiogram scale or readout would compute something else.

    Raises:
      ValueError naming model.head_checkpoint and the settings or parameter that differ.
    """
    from haaqi_jax.head import HeadConfig
    from haaqi_jax.model import HAAQINet, check_param_tree
    from haaqi_jax.train.checkpoint import load_config, load_params

    where = f"model.head_checkpoint {path}"
    try:
        meta = load_config(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model.head_checkpoint: {err}") from None
    if meta.get("kind") != "haaqinet":
        raise ValueError(f"{where}: config.json has kind {meta.get('kind')!r}; expected "
                         "'haaqinet' (a converted HAAQI-Net or a run's report/best_model)")
    training_only = ("dropout_rate", "lstm_dropout_rate")
    # Through HeadConfig: a folder saved before a setting existed has its default.
    theirs = {k: v for k, v in HeadConfig.from_dict(dict(meta["config"].get("head", {})))
              .to_dict().items() if k not in training_only}
    ours = {k: v for k, v in net.config.head.to_dict().items() if k not in training_only}
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differ:
        raise ValueError(f"{where}: its head differs from model.head in "
                         + ", ".join(f"{k} ({theirs.get(k)!r} there, {ours.get(k)!r} here)"
                                     for k in differ)
                         + "; to match it: " + " ".join(f"--set model.head.{k}={theirs.get(k)!r}"
                                                        for k in differ))
    params, _ = load_params(path)
    width = lambda head: head.get("adapter", {}).get("kernel", np.zeros((0, 0))).shape[0]
    if width(params["head"]) != width(net.params["head"]):
        cfg = meta["config"]
        raise ValueError(f"{where}: its head reads {width(params['head'])}-wide encoder "
                         f"features, this run's encoder gives {width(net.params['head'])}: it "
                         f"was trained on another encoder (there: encoder_kind="
                         f"{cfg.get('encoder_kind')!r}, encoder_config="
                         f"{json.dumps(cfg.get('encoder_config'), sort_keys=True)}); set "
                         f"model.encoder_kind / model.encoder_config as that run had them")
    check_param_tree(params["head"], net.params["head"], where)
    print(f"head: initialised from {path}", file=sys.stderr)
    return HAAQINet(net.config, {**net.params,
                                 "head": jax.tree_util.tree_map(jnp.asarray, params["head"])})


def frozen_patterns(config: Any) -> tuple[str, ...]:
    patterns = tuple(config.train.get("frozen_patterns", ()))
    if config.model.freeze_encoder:
        patterns += ("encoder/.*",)
    return patterns


def run_dtype(config: Any, where: str = "model.dtype") -> Any:
    """The compute dtype of a run config's `model.dtype` (absent: "float32") as the modules'
    `dtype` attribute (`haaqi_jax.model.compute_dtype`: None for float32); ValueError naming
    `where` for another name."""
    from haaqi_jax.model import compute_dtype
    return compute_dtype(config.model.get("dtype", "float32"), where)


def make_forward(net_cfg: Any, mode: str, dtype: Any = None) -> steps_lib.ForwardFn:
    """The step's forward: the head on features, preceded by the encoder in waveform mode;
    `dtype` is the compute dtype (`run_dtype`; None = float32)."""
    from haaqi_jax.head import HAAQINetHead
    from haaqi_jax.model import HAAQINetModel

    head_forward = steps_lib.make_head_forward(HAAQINetHead(net_cfg.head, dtype))
    if mode == "features":
        return head_forward
    model = HAAQINetModel(net_cfg, dtype)

    def encode(params, waveform, padding_mask, *, rng=None, deterministic=True):
        rngs = None if (deterministic or rng is None) else {"dropout": rng}
        return model.apply({"params": params}, waveform, padding_mask,
                           deterministic=deterministic, rngs=rngs, method="encode")

    return steps_lib.make_encoder_head_forward(encode, head_forward)


# ----------------------------------------------------------------------------- data


def resolve_manifest(config: Any) -> Path:
    """data.manifest, or the demo dataset (built once, then reused) when it is None."""
    d = config.data
    if d.get("manifest"):
        return Path(d.manifest)
    from haaqi_jax.data.demo import DEFAULT_SECONDS, build_demo_dataset
    seconds = d.get("demo_seconds") or DEFAULT_SECONDS
    return sharding.main_process_first("demo dataset", lambda: build_demo_dataset(
        d.demo_dir, n_clips=int(d.demo_clips), seed=int(d.demo_seed),
        clip_seconds=(float(seconds[0]), float(seconds[1])),
        batch_size=int(d.get("demo_label_batch") or 8),
        progress=bool(config.train.get("progress", True))))


def make_encode_fn(net: Any) -> Callable[[np.ndarray, np.ndarray], tuple[Any, Any]]:
    """(waveform (B, N), padding_mask (B, N) True = pad) -> (features, token padding mask
    True = pad): the frozen encoder as the feature cache calls it (`HAAQINet.encode`: jitted,
    eval mode, split over this host's devices)."""

    def encode_fn(waveform, padding_mask):
        features, token_mask = net.encode(waveform, padding_mask)
        return features, ~token_mask

    return encode_fn


def _hold_out_stages(config: Any) -> tuple[str, ...]:
    return tuple(config.data.get("hold_out") or ())


def evaluated_splits(config: Any) -> tuple[str, ...]:
    """The splits the final report scores: the validation split, data.eval_splits, then the
    leave-distortion-out split when data.hold_out names stages."""
    from haaqi_jax.data.manifest import HELD_OUT_SPLIT

    d = config.data
    splits = (d.valid_split,) + tuple(s for s in d.eval_splits if s != d.valid_split)
    if _hold_out_stages(config) and HELD_OUT_SPLIT not in splits:
        splits += (HELD_OUT_SPLIT,)
    return splits


def _valid_split_hint(config: Any, splits: Mapping[str, Sequence[Any]]) -> str:
    others = [s for s in splits if s != config.data.train_split]
    if others:
        return (f"; if one of {others} is the validation split, name it with --set "
                "data.valid_split=NAME")
    return (f"; give some rows \"split\": \"{config.data.valid_split}\", or leave \"split\" out "
            f"of the rows so that data.valid_fraction ({config.data.valid_fraction}) carves one "
            f"at random")


def load_splits(config: Any) -> dict[str, list[Any]]:
    """The manifest's rows (labels required, files checked) grouped into the splits the run
    uses: train, valid and `evaluated_splits`. With data.hold_out, train and valid rows of
    those distortion stages form the split "held_out" instead (`hold_out_distortions`).
    Errors name the manifest line and row id; splits of the manifest that the run does not
    use, and data.eval_splits names it lacks, are noted on stderr."""
    from haaqi_jax.data.manifest import hold_out_distortions, read_manifest, split_rows

    d = config.data
    manifest = resolve_manifest(config)
    rows = read_manifest(manifest, require_label=True, check_files=True,
                         progress=bool(config.train.get("progress", True)))
    splits = split_rows(rows, valid_fraction=float(d.valid_fraction), seed=int(config.seed))
    if _hold_out_stages(config):
        try:
            splits = hold_out_distortions(splits, _hold_out_stages(config),
                                          from_splits=(d.train_split, d.valid_split))
        except ValueError as err:
            raise ValueError(f"{manifest}: data.hold_out: {err}") from None
    counts = {k: len(v) for k, v in splits.items()}
    for needed in (d.train_split, d.valid_split):
        if not splits.get(needed):
            hint = _valid_split_hint(config, splits) if needed == d.valid_split else ""
            raise ValueError(f"{manifest}: split {needed!r} has no rows (splits: {counts})"
                             f"{hint}")
    wanted = [d.train_split] + [s for s in evaluated_splits(config) if s != d.train_split]
    if sharding.is_main_process():
        unused = {s: n for s, n in counts.items() if s not in wanted}
        if unused:
            # The hint names only splits that exist (a misspelt eval split is named apart).
            scored = [s for s in list(d.eval_splits) + list(unused) if s in counts]
            print(f"note: {manifest}: split(s) {unused} are neither trained on nor scored in "
                  f"the report; score them with --set \"data.eval_splits=("
                  f"{', '.join(repr(s) for s in scored)})\"", file=sys.stderr)
        unsplit = {row.id for row in rows if row.split is None and row.group is None}
        train_files = {row.file_path for row in splits.get(d.train_split, ())
                       if row.id in unsplit}
        shared = {row.file_path for row in splits.get(d.valid_split, ())
                  if row.id in unsplit and row.file_path in train_files}
        if shared:
            print(f"note: {manifest}: {len(shared)} clip(s) have rows in both train and valid "
                  f"(e.g. {sorted(shared)[0]}): rows without a split are divided one by one; "
                  f"give the rows of one clip the same \"group\" to keep it on one side",
                  file=sys.stderr)
        missing = [s for s in d.eval_splits if s not in splits]
        if missing:
            print(f"note: {manifest} has no rows in data.eval_splits {missing} (splits: "
                  f"{counts}); the report leaves them out", file=sys.stderr)
    return {s: splits[s] for s in wanted if splits.get(s)}


#: Beside config.json: what the run's train and valid rows were (`check_run_data`).
DATA_FILE = "data.json"


def rows_digest(rows: Sequence[Any]) -> str:
    """A digest of what training reads from rows: ids, files, channels, audiograms, labels."""
    import hashlib
    h = hashlib.sha1()
    for row in rows:
        h.update(json.dumps([row.id, str(row.file_path), row.channel, row.haaqi_score,
                             row.haaqi_components, np.asarray(row.audiogram).tolist()]).encode())
    return h.hexdigest()[:16]


#: Config keys that name weights a run starts from (files that may change under one path):
#: a distillation's teacher too (a teacher run resumed or retrained into the same folder).
_WEIGHT_SOURCES = ("model.encoder_checkpoint", "model.head_checkpoint",
                   "distill.teacher_checkpoint")


def check_run_data(config: Any, splits: Mapping[str, Sequence[Any]], workdir: Path,
                   net: Any = None, *, start_params: Any = None) -> None:
    """Refuses to resume a run whose train or valid rows, or starting weights, changed since it
    started.

    A manifest relabelled in place (e.g. with other HAAQI settings), or rows added, dropped or
    pointed at other files, would otherwise continue the old run on new data, its best
    checkpoint chosen on the old labels; weights converted anew into the same
    model.encoder_checkpoint / head_checkpoint folder, or another teacher in
    distill.teacher_checkpoint, would mix two models. Writes workdir/data.json (main process)
    otherwise.

    Args:
      start_params: the weights the run starts from when a `_WEIGHT_SOURCES` key is set
        (default `net.params`; a distillation passes its teacher's, from which it makes the
        student).
    """
    from haaqi_jax.data.cache import params_fingerprint

    d = config.data
    record = {"manifest": str(d.get("manifest") or f"the demo dataset in {d.demo_dir}"),
              **{f"{role}_split": {"name": name, "rows": len(splits[name]),
                                   "digest": rows_digest(splits[name])}
                 for role, name in (("train", d.train_split), ("valid", d.valid_split))}}
    sources = [key for key in _WEIGHT_SOURCES
               if (config.get(key.split(".")[0]) or {}).get(key.split(".", 1)[1])]
    if start_params is None and net is not None:
        start_params = net.params
    if start_params is not None and sources:
        record["starting_weights"] = params_fingerprint(start_params)
    path = workdir / DATA_FILE
    if path.is_file() and cfglib.holds_a_run(workdir):
        saved = read_json(path, "the record of the run's data")
        if saved.get("starting_weights", record.get("starting_weights")) != \
                record.get("starting_weights"):
            raise ValueError(f"{workdir} holds a run that started from other weights: the "
                             f"files behind {' / '.join(sources)} changed since. Resuming "
                             f"would mix two models: pass another --workdir, or delete "
                             f"{workdir} to start over.")
        changed = [f"{role} split ({saved[role]['rows']} rows -> {record[role]['rows']} rows"
                   + (")" if saved[role]["rows"] != record[role]["rows"] else
                      ", other files, audiograms or labels)")
                   for role in ("train_split", "valid_split")
                   if saved.get(role, {}).get("digest") != record[role]["digest"]]
        if changed:
            raise ValueError(f"{workdir} holds a run trained on other data: the "
                             f"{' and the '.join(c.replace('_split', '') for c in changed)} of "
                             f"{record['manifest']} changed since. Resuming would mix the two: "
                             f"pass another --workdir, or delete {workdir} to start over.")
    if sharding.is_main_process():
        write_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def build_train_data(config: Any, net: Any, workdir: Path,
                     splits: Mapping[str, Sequence[Any]] | None = None, *,
                     start_params: Any = None) -> TrainData:
    """Builds the train iterator and the eval batches of `splits` (default `load_splits`):
    on cached features (data.cache) or on waveforms. `start_params`: see `check_run_data`.

    Multi-host: every host plans the same global batches and yields its own slice
    (shard_index = jax.process_index()); see haaqi_jax.train.sharding.
    """
    from haaqi_jax.data import cache as cache_lib
    from haaqi_jax.data import pipeline

    d, tc = config.data, config.train
    used = dict(load_splits(config) if splits is None else splits)
    check_run_data(config, used, workdir, net, start_params=start_params)
    in_cfg = pipeline.InputConfig(
        batch_size=int(tc.batch_size), shuffle=True, seed=int(config.seed),
        crop_seconds=d.get("crop_seconds"), prefetch=int(d.prefetch),
        bucket_pool=int(d.bucket_pool), shard_index=jax.process_index(),
        shard_count=jax.process_count())
    eval_cfg = dataclasses.replace(in_cfg, batch_size=int(tc.eval_batch_size), shuffle=False,
                                   crop_seconds=None)
    if d.cache:
        layers = "all" if net.config.feature_mode == "weighted" else "last"
        identity = {k: v for k, v in net.config.to_dict().items()
                    if k in ("encoder_kind", "encoder_config", "feature_mode", "feature_layers")}
        cache = sharding.main_process_first("feature cache", lambda: cache_lib.build_feature_cache(
            [r for s in used.values() for r in s], make_encode_fn(net),
            d.get("cache_dir") or (workdir / "feature_cache"), batch_size=int(d.encode_batch_size),
            layers=layers, dtype=d.cache_dtype,
            # (an encoder without weights, e.g. fbank_patches with position_dim 0, has no entry)
            fingerprint=cache_lib.params_fingerprint(net.params.get("encoder", {}), identity),
            probe=True,   # features of an encoder whose code changed are not reused
            progress=bool(config.train.get("progress", True))))
        if in_cfg.crop_seconds is not None:
            raise ValueError("data.crop_seconds must be None with data.cache=True (cached "
                             "features are of whole clips)")
        train = cache_lib.make_feature_batches(cache, used[d.train_split], in_cfg, train=True)
        eval_batches = lambda split: cache_lib.make_feature_batches(  # noqa: E731
            cache, used[split], eval_cfg, train=False)
        mode = "features"
    else:
        train = pipeline.make_train_iterator(used[d.train_split], in_cfg)
        eval_batches = lambda split: pipeline.make_eval_batches(used[split], eval_cfg)  # noqa
        mode = "waveform"
    return TrainData(mode=mode, train=train, steps_per_epoch=train.steps_per_epoch,
                     eval_batches=eval_batches, rows=used)


# ----------------------------------------------------------------------------- logging


class MetricsWriter:
    """Appends one JSON object per line to workdir/metrics.jsonl (main process only).

    On resume, lines logged after the restored step are dropped first, so the file reads as
    one uninterrupted run.
    """

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.enabled = sharding.is_main_process()
        if self.enabled and path.exists():
            keep = []
            if resume_step is not None:
                # A line cut short by a kill goes (it was logged after the last checkpoint).
                for number, line in enumerate(complete_lines(path), start=1):
                    if not line.strip():
                        continue
                    try:
                        step = json.loads(line).get("step", 0)
                    except (json.JSONDecodeError, AttributeError):
                        raise ValueError(f"{path}, line {number}: not a JSON record; the file "
                                         f"is damaged (delete the line to resume)") from None
                    if step <= resume_step:
                        keep.append(line)
            write_atomic(path, "".join(line + "\n" for line in keep))

    def write(self, record: Mapping[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(metrics_lib.json_safe(dict(record)), sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- evaluation


def run_eval(eval_step: Callable, params: Any, batches: Iterable[Mapping[str, np.ndarray]],
             mesh: Any, keys: Sequence[str], num_rows: int) -> tuple[float, np.ndarray]:
    """(weighted mean loss, predicted clip score per row, NaN for rows never seen)."""
    loss_sum, weight_sum = 0.0, 0.0
    predictions = np.full(num_rows, np.nan, np.float64)
    for batch in batches:
        global_batch = sharding.shard_batch(batch, mesh, tuple(keys) + ("index",))
        out = eval_step(params, global_batch)
        loss_sum += float(out["loss_sum"])
        weight_sum += float(out["weight_sum"])
        # Global (all hosts') scores, rows and weights, in the same order.
        scores = sharding.to_host(out["clip_score"])
        index = sharding.to_host(global_batch["index"])
        real = sharding.to_host(global_batch["weight"]) > 0
        predictions[index[real]] = scores[real]
    return (loss_sum / weight_sum if weight_sum else float("nan")), predictions


def split_labels(rows: Sequence[Any], split: str, row_fields: Sequence[str] = ()
                 ) -> np.ndarray:
    """(n,) HAAQI labels of a split's rows; a row without one, or without one of the further
    `row_fields` a loss needs (`losses.required_row_fields`), is an error naming it."""
    labels = []
    for row in rows:
        if row.haaqi_score is None:
            raise ValueError(f"split {split!r}: {row.describe()} has no HAAQI label "
                             "(haaqi_score); label the manifest first (haaqi-jax label)")
        for field in row_fields:
            if getattr(row, field) is None:
                raise ValueError(f"split {split!r}: {row.describe()} has no {field!r}, which "
                                 f"the configured loss needs (the demo labeller writes it)")
        labels.append(float(row.haaqi_score))
    return np.asarray(labels, np.float64)


def training_labels(config: Any, rows: Mapping[str, Sequence[Any]]) -> np.ndarray:
    """Checks the train and valid rows for what the configured loss needs (a label and its
    `losses.required_row_fields`), tries the metrics of your own that train.monitor and
    report.metrics name on the valid labels (`metrics.try_metrics`), and returns those."""
    needs = losses.required_row_fields(config.loss.name,
                                       cfglib.to_dict(config.loss.get("kwargs") or {}))
    valid_split = config.data.valid_split
    valid_labels = split_labels(rows[valid_split], valid_split, needs)
    split_labels(rows[config.data.train_split], config.data.train_split, needs)
    monitor = config.train.get("monitor", metrics_lib.LOSS)
    metrics_lib.try_metrics(metrics_lib.own_metric_names(
        [] if monitor == metrics_lib.LOSS else [monitor]), valid_labels, "train.monitor",
        valid_split)
    report = config.get("report") or {}
    metrics_lib.try_metrics(metrics_lib.own_metric_names(list(report.get("metrics", ())),
                                                         "report.metrics"),
                            valid_labels, "report.metrics", valid_split)
    return valid_labels


# ----------------------------------------------------------------------------- the loop


def _meta(data_state: Any, early: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON part of a checkpoint: where the data iterator is, early-stopping bookkeeping."""
    return {"data_state": data_state, "early_stopping": dict(early)}


def train_and_evaluate(config: Any, workdir: str | os.PathLike, *,
                       data: TrainData | None = None) -> TrainResult:
    """Trains, evaluates and writes a report; resumes from workdir's latest checkpoint.

    Args:
      config: a ConfigDict (see configs/default.py for the fields).
      workdir: output folder (config.json, metrics.jsonl, checkpoints/, report/).
      data: prebuilt TrainData; default `build_train_data(config, ...)`.
    Returns:
      TrainResult (final state, best step and loss, whether training stopped early or was
      interrupted by `train.stop_after_steps`).
    Raises:
      ValueError when another run is writing `workdir` (its main process holds the lock file
      `workdir/.lock`): two runs would interleave their checkpoints and metrics.
    """
    workdir = Path(workdir).absolute()
    check_run_settings(config)          # a mistyped key leaves no folder behind
    if "distill" in config:  # configs/distill.py: the student learns from a teacher
        from haaqi_jax.distill import check_distill_settings, distill_and_evaluate
        check_distill_settings(config)
        with sole_run(workdir):
            return distill_and_evaluate(config, workdir, data=data)
    with sole_run(workdir):
        return _train_and_evaluate(config, workdir, data=data)


#: The lock file of a workdir that a run is writing.
LOCK_FILE = ".lock"


@contextlib.contextmanager
def sole_run(workdir: Path) -> Iterator[None]:
    """Keeps other runs out of `workdir` while this one writes it. The main process holds the
    lock file; on a multi-host run (one shared workdir) every process learns whether it got
    it, so that a refused run stops on all hosts, not on one while the others wait."""
    busy = (f"another run is writing {workdir} (lock {workdir / LOCK_FILE}): wait for it to "
            f"finish, or pass another --workdir")
    held, refused = contextlib.ExitStack(), None
    if sharding.is_main_process():
        try:
            held.enter_context(exclusive_lock(workdir / LOCK_FILE, busy))
        except ValueError as err:
            refused = err
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        if not int(multihost_utils.broadcast_one_to_all(np.int32(refused is None))):
            refused = refused or ValueError(busy)
    if refused is not None:
        raise refused
    with held:
        yield


def _train_and_evaluate(config: Any, workdir: Path, *, data: TrainData | None) -> TrainResult:
    workdir.mkdir(parents=True, exist_ok=True)
    cfglib.save_run_config(config, workdir, CONFIG_FILE, write=sharding.is_main_process())
    tc = config.train

    mesh = sharding.make_mesh()      # (check_run_settings checked the batches divide over it)

    splits = load_splits(config) if data is None else None  # bad rows fail before compiling
    net = build_model(config)
    check_frozen(config, net)
    if data is None:
        data = build_train_data(config, net, workdir, splits)
    mode = data.mode
    if mode == "features" and not net.config.freeze_encoder:
        raise ValueError("data.cache=True trains the head on cached encoder features, which "
                         "needs model.freeze_encoder=True")
    keys = BATCH_KEYS[mode]
    valid_split = config.data.valid_split
    valid_labels = training_labels(config, data.rows)

    params = trained_params(net, cached=mode == "features")
    labels = state_lib.param_labels(params, frozen_patterns(config))
    total_steps = int(tc.num_epochs) * data.steps_per_epoch
    tx = state_lib.make_optimizer(config.optimizer, labels, total_steps)
    ema_decay = float(tc.get("ema_decay", 0.0))
    state = sharding.replicate(state_lib.create_train_state(params, tx, int(config.seed),
                                                            ema_decay=ema_decay), mesh)

    loss_fn = losses.get_loss(config.loss.name, **cfglib.to_dict(config.loss.get("kwargs") or {}))
    forward = make_forward(net.config, mode, run_dtype(config))
    train_step, eval_step = steps_lib.jit_steps(
        steps_lib.make_train_step(forward, loss_fn, tx, labels, ema_decay=ema_decay),
        steps_lib.make_eval_step(forward, loss_fn), mesh)

    # With train.ema_decay > 0 the moving average is what is validated, kept as best and
    # reported (state_lib.eval_params).
    run = run_loop(
        state, step_fn=train_step,
        evaluate=lambda st: run_eval(eval_step, state_lib.eval_params(st),
                                     data.eval_batches(valid_split), mesh, keys,
                                     len(valid_labels)),
        data=data, mesh=mesh, keys=keys, valid_labels=valid_labels, tc=tc, workdir=workdir)
    state, step, early, interrupted, ckpt = (run.state, run.step, run.early, run.interrupted,
                                             run.ckpt)

    report_dir = None
    if not interrupted and early["best_step"] is not None and tc.get("write_report", True):
        best_state, _ = ckpt.restore(int(early["best_step"]), state)
        report_dir = write_training_report(config, net, state_lib.eval_params(best_state),
                                           data, eval_step, mesh, keys, workdir / REPORT_DIR,
                                           {**early, "stopped": run.stopped_early})
    ckpt.close()
    return TrainResult(workdir=workdir, final_step=step, best_step=early["best_step"],
                       best_valid_loss=early["best_valid_loss"], stopped_early=run.stopped_early,
                       interrupted=interrupted, state=state, report_dir=report_dir,
                       monitor=early["monitor"], best_value=early["best_value"])


@dataclasses.dataclass
class LoopRun:
    """What `run_loop` leaves: the last state and step, the early-stopping record, whether a
    test hook stopped it, the (still open) checkpoint manager, and whether patience ended the
    run before its last planned step (patience running out on the last epoch is no early
    stop: every step ran)."""

    state: Any
    step: int
    early: dict
    interrupted: bool
    ckpt: TrainCheckpointManager
    stopped_early: bool = False


def _check_finite(record: Mapping[str, float], where: str, ckpt: Any) -> None:
    """Stops the loop on a NaN or infinite logged term (never trains on, or keeps as best,
    NaN). Every term counts, not the loss alone: a step's loss is that of the parameters
    before it, so a finite loss with a NaN gradient (grad_norm), or an update that overflowed
    (param_norm, the norm after it), has already made the new parameters NaN or inf, and the
    checkpoint that follows the check would keep them."""
    bad = [k for k, v in record.items() if not np.isfinite(v)]
    if not bad:
        return
    kept = ckpt.latest_step()
    raise ValueError(f"{where}: the loss is {record['loss']} (not finite: {', '.join(bad)}); "
                     f"check the loss (loss.name, loss.kwargs) and optimizer.learning_rate. "
                     + ("No checkpoint was kept." if kept is None else
                        f"The last finite checkpoint, step {kept}, is kept."))


def run_loop(state: Any, *, step_fn: Callable, evaluate: Callable, data: TrainData, mesh: Any,
             keys: Sequence[str], valid_labels: np.ndarray, tc: Any, workdir: Path,
             desc: str = "train") -> LoopRun:
    """The optimisation loop shared by training and distillation.

    Resumes from the latest checkpoint (state, data position, early-stopping record), then
    steps until `tc.num_epochs` epochs or early stopping: logs train scalars every
    `tc.log_every_steps`, evaluates at each epoch end (valid loss, LCC, SRCC, MSE and the
    metric `tc.monitor` names; patience on that quantity, default the valid loss) and
    checkpoints there and every `tc.checkpoint_every_steps`.

    Args:
      state: the replicated TrainState (restored over if a checkpoint exists).
      step_fn: jitted (state, sharded batch) -> (state, scalar metrics).
      evaluate: state -> (valid loss, (n_valid,) predictions).
    """
    from tqdm.auto import tqdm
    from haaqi_jax.train.checkpoint import TrainCheckpointManager

    total_steps = int(tc.num_epochs) * data.steps_per_epoch
    ckpt = TrainCheckpointManager(workdir / CHECKPOINT_DIR)
    monitor = metrics_lib.check_monitor(tc.get("monitor", metrics_lib.LOSS))
    early = early_stopping.new_record(monitor)
    warn = (lambda text: print(f"{desc}: {text}", file=sys.stderr)) \
        if sharding.is_main_process() else (lambda text: None)
    restored = ckpt.restore_latest(state, warn)
    start = None
    if restored is not None:
        start, state, meta = restored
        warn(f"resuming {workdir} from its checkpoint at step {start}")
        data.train.set_state(meta["data_state"])
        try:
            early = early_stopping.resumed_record(meta["early_stopping"], monitor)
        except ValueError as err:
            raise ValueError(f"{workdir}: {err}") from None
        # train.patience may change on a resume: the stop is decided again with its value.
        early["stopped"] = 0 < int(tc.patience) <= early["bad_epochs"]
        if early["stopped"] and int(state.step) < total_steps and sharding.is_main_process():
            print(f"{desc}: the run stopped early at step {int(state.step)} ("
                  f"{early['bad_epochs']} epochs without a better validation {monitor}, "
                  f"train.patience={int(tc.patience)}); raise train.patience, or set it to 0, "
                  "to train on", file=sys.stderr)
    start_step = int(state.step)
    writer = MetricsWriter(workdir / METRICS_FILE, start_step if start is not None else None)

    stop_after = int(tc.get("stop_after_steps", 0))
    ckpt_every = int(tc.checkpoint_every_steps)
    log_every = int(tc.log_every_steps)
    patience = int(tc.patience)
    interrupted = False
    step = start_step
    pending: list[dict] = []
    warned_constant = warned_undefined = False
    postfix: dict[str, str] = {}        # the progress bar's: train loss, best monitored value
    bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
               disable=not (tc.get("progress", True) and sharding.is_main_process()))
    try:
        while step < total_steps and not early["stopped"]:
            if stop_after and step >= stop_after:
                interrupted = True  # test hook: behaves like a kill after this step
                if sharding.is_main_process():
                    kept = ckpt.latest_step()
                    print(f"{desc}: stopped at step {step} (train.stop_after_steps), without a "
                          f"report; run again without it to resume "
                          + ("from the start (no checkpoint yet)" if kept is None else
                             f"from the checkpoint at step {kept}"), file=sys.stderr)
                break
            batch = next(data.train)
            state, step_metrics = step_fn(state, sharding.shard_batch(batch, mesh, keys))
            step += 1
            bar.update(1)
            pending.append(step_metrics)
            at_checkpoint = ckpt_every > 0 and step % ckpt_every == 0
            at_epoch_end = step % data.steps_per_epoch == 0
            # Flushing the log at every checkpoint keeps a resumed log identical.
            if step % log_every == 0 or at_epoch_end or at_checkpoint:
                host = jax.device_get(pending)
                record = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
                _check_finite(record, f"{desc} steps {step - len(host) + 1}-{step}", ckpt)
                writer.write({"step": step, "kind": "train", **record})
                postfix["loss"] = f"{record['loss']:.4f}"
                bar.set_postfix(postfix)
                pending = []
            if at_epoch_end:
                epoch = step // data.steps_per_epoch
                valid_loss, predictions = evaluate(state)
                _check_finite({"loss": valid_loss}, f"validation at step {step}", ckpt)
                summary = metrics_lib.summarize(predictions, valid_labels,
                                                np.isfinite(predictions).astype(float))
                if not warned_constant and _is_constant(predictions):
                    warned_constant = True
                    warn(f"validation predictions are all {np.nanmax(predictions):.6g} at step "
                         f"{step}: the model scores every clip alike (a saturated or dead "
                         "head; LCC and SRCC are undefined). Lower optimizer.learning_rate, or "
                         "check the labels and the loss")
                values = {"loss": valid_loss, **{k: summary[k] for k in ("lcc", "srcc", "mse")}}
                if monitor not in values:           # a metric of the user's (register_metric)
                    values[monitor] = metrics_lib.metric_value(
                        monitor, predictions, valid_labels,
                        np.isfinite(predictions).astype(float))
                improved = early_stopping.update(early, valid_loss, step, value=values[monitor],
                                                 min_delta=float(tc.min_delta),
                                                 patience=patience)
                writer.write({"step": step, "epoch": epoch, "kind": "valid", **values,
                              "best": improved})
                if not warned_undefined and not np.isfinite(values[monitor]):
                    warned_undefined = True
                    warn(f"validation {monitor} (train.monitor) is undefined at step {step}: "
                         "an epoch without a value never becomes the best one"
                         + ("; the first epoch stays the best until one has a value"
                            if early["best_value"] is None else ""))
                best = early["best_value"]
                postfix[f"best valid {monitor}"] = "n/a" if best is None else f"{best:.4f}"
                bar.set_postfix(postfix)
                ckpt.save(step, state, _meta(data.train.get_state(), early),
                          metrics={"valid_loss": valid_loss}, keep=(early["best_step"],))
            elif at_checkpoint:
                ckpt.save(step, state, _meta(data.train.get_state(), early),
                          keep=(early["best_step"],))
    finally:
        bar.close()
    return LoopRun(state=state, step=step, early=early, interrupted=interrupted, ckpt=ckpt,
                   stopped_early=bool(early["stopped"]) and step < total_steps)


def _is_constant(predictions: np.ndarray) -> bool:
    """True when at least two finite predictions exist and all are equal."""
    finite = predictions[np.isfinite(predictions)]
    return finite.size > 1 and np.ptp(finite) == 0


#: Loop settings and their least values (a negative epoch count would train nothing and
#: exit 0; a zero batch fails deep in the input pipeline). num_epochs=0 builds the data and
#: its feature cache only (the README's multi-host recipe).
_LEAST_VALUES = {"seed": 0, "data.demo_seed": 0, "data.demo_label_batch": 1,
                 "train.batch_size": 1, "train.eval_batch_size": 1, "train.num_epochs": 0,
                 "train.patience": 0, "train.log_every_steps": 1,
                 "train.checkpoint_every_steps": 1, "train.stop_after_steps": 0,
                 "data.encode_batch_size": 1, "data.demo_clips": 1, "data.prefetch": 0,
                 "report.num_example_predictions": 0}


def trained_params(net: Any, *, cached: bool) -> dict[str, Any]:
    """The parameters a train state holds: what the step uses, the head alone on cached
    features."""
    return {"head": net.params["head"]} if cached else dict(net.params)


def check_frozen(config: Any, net: Any) -> None:
    """ValueError for a train.frozen_patterns entry that is no regular expression or matches no
    parameter, or when nothing is left to train."""
    state_lib.check_frozen_patterns(tuple(config.train.get("frozen_patterns", ())), net.params,
                                    "train.frozen_patterns")
    params = trained_params(net, cached=bool(config.data.cache))
    if state_lib.count_params(params, state_lib.param_labels(params,
                                                             frozen_patterns(config))) == 0:
        raise ValueError("every parameter is frozen (model.freeze_encoder and "
                         "train.frozen_patterns): nothing would train")


def check_run_settings(config: Any) -> None:
    """The loop's counts, the optimizer, the loss, the data's fractions, crops and demo clip
    lengths, the head's settings and the report's, checked before anything is built or
    trained; ValueError names the key."""
    from haaqi_jax.evaluate import check_color_by, check_report_metrics

    cfglib.check_run_keys(config)
    run_dtype(config)
    if "distill" in config and config.distill.get("teacher") is not None:
        run_dtype(config.distill.teacher, "distill.teacher.model.dtype")
    if "distill" not in config:  # (a distillation reads its checkpoints from distill.*)
        from haaqi_jax.train.checkpoint import load_config
        for key in ("encoder_checkpoint", "head_checkpoint"):
            if config.model.get(key):
                try:
                    load_config(config.model[key])
                except FileNotFoundError as err:
                    raise FileNotFoundError(f"model.{key}: {err}") from None
    check_color_by(config.report.color_by, "report.color_by")
    check_report_metrics(config.report.get("metrics", ()), "report.metrics")
    for dotted, least in _LEAST_VALUES.items():
        section, _, key = dotted.rpartition(".")
        where = config.get(section) if section else config   # "seed" is top level
        if where is None or key not in where:
            continue
        value = where[key]
        if not cfglib.is_whole(value) or value < least:
            raise ValueError(f"{dotted} must be a whole number >= {least}, got {value!r}")
    if "train" in config:       # the global batches divide over this run's devices and hosts
        mesh = sharding.make_mesh()
        for key in ("batch_size", "eval_batch_size"):
            if key in config.train:
                sharding.check_global_batch(int(config.train[key]), mesh, f"train.{key}")
    if "train" in config:
        metrics_lib.check_monitor(config.train.get("monitor", metrics_lib.LOSS))
    min_delta = config.train.get("min_delta", 0.0) if "train" in config else 0.0
    if not cfglib.is_number(min_delta) or not 0 <= min_delta < float("inf"):
        raise ValueError(f"train.min_delta must be a number >= 0, got {min_delta!r}")
    state_lib.check_optimizer(config.get("optimizer") or {})
    if "train" in config:
        ema_decay = state_lib.check_ema_decay(config.train.get("ema_decay", 0.0))
        if ema_decay != 0.0 and "distill" in config:
            raise ValueError(f"train.ema_decay={ema_decay}: a distillation keeps no moving "
                             "average of its parameters; set train.ema_decay=0")
    from haaqi_jax.data.cache import STORAGE_DTYPES
    cache_dtype = config.data.get("cache_dtype", "float16")
    if cache_dtype not in STORAGE_DTYPES:
        raise ValueError(f"data.cache_dtype must be one of {STORAGE_DTYPES}, got "
                         f"{cache_dtype!r}")
    if "distill" not in config and "loss" in config:  # (a distillation checks its own)
        name = config.loss.name
        if losses.has_learnable_params(name):
            raise ValueError(f"loss.name={name!r} has learnable parameters (register_loss("
                             "params=...)), which only a distillation trains (configs/distill"
                             ".py): plain training would not give the loss its loss_params")
        losses.check_loss_config(name, cfglib.to_dict(config.loss.get("kwargs") or {}))
    cfglib.check_fraction(config.data.get("valid_fraction", 0.0), "data.valid_fraction")
    crop = config.data.get("crop_seconds")
    if crop is not None and (not cfglib.is_number(crop) or not 0 < crop < float("inf")):
        raise ValueError(f"data.crop_seconds must be None or seconds > 0, got {crop!r}")
    # The encoder's settings (names and types) before any data is built; with a converted
    # checkpoint (or a distillation's teacher checkpoint) that checkpoint's are used instead.
    teacher = config.distill.get("teacher") if "distill" in config else None
    for where, run in (("", config), ("distill.teacher.", teacher)):
        if (run is None or not run.get("model") or not run.model.get("encoder_kind")
                or run.model.get("encoder_checkpoint")
                or (where and config.distill.get("teacher_checkpoint"))):
            continue
        try:
            build_model_config(run)
        except ValueError as err:
            raise ValueError(f"{where}{err}") from None
    if config.get("model") and config.model.get("head"):
        from haaqi_jax.head import HeadConfig
        try:                        # the head's own checks, before any data is built
            HeadConfig.from_dict(cfglib.to_dict(config.model.head))
        except ValueError as err:
            raise ValueError(f"model.head: {err}") from None
    seconds = config.data.get("demo_seconds")
    if seconds is not None:
        if (isinstance(seconds, (str, bytes)) or len(seconds) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in seconds) or not 0 < seconds[0] <= seconds[1]):
            raise ValueError(f"data.demo_seconds must be (shortest, longest) clip seconds with "
                             f"0 < shortest <= longest, got {seconds!r}")


#: The report's copy of the run's rows, each with the split it was trained or scored in.
SPLIT_MANIFEST = "manifest.jsonl"
#: The report's learning curves (`haaqi_jax.train.curves`).
CURVES_FILE = "curves.png"


def write_split_manifest(rows: Mapping[str, Sequence[Any]], path: Path) -> Path:
    """Writes every row of the run with the split the run put it in (a random train/valid
    split, `data.hold_out` or the manifest's own), so that `haaqi-jax evaluate --manifest` on
    this file rescores exactly the run's splits. Rows that are not ManifestRows are skipped."""
    from haaqi_jax.data import manifest as manifest_lib
    return manifest_lib.write_manifest(path, [
        dataclasses.replace(row, split=split)
        for split, split_rows in rows.items() for row in split_rows
        if isinstance(row, manifest_lib.ManifestRow)])


def write_training_report(config: Any, net: Any, params: Any, data: TrainData,
                          eval_step: Callable, mesh: Any, keys: Sequence[str], out_dir: Path,
                          early: Mapping[str, Any]) -> Path:
    """Evaluates the best params on every eval split and writes the report folder, with the
    metrics report.metrics names and train.monitor's when it is one of your own.
    `early["stopped"]` is written as training.json's stopped_early: True when patience ended
    the run before its last planned step (`LoopRun.stopped_early`)."""
    from haaqi_jax.evaluate import prediction_records, write_report
    from haaqi_jax.model import HAAQINet

    records = []
    for split in evaluated_splits(config):
        if split not in data.rows or not len(data.rows[split]):
            continue
        _, predictions = run_eval(eval_step, params, data.eval_batches(split), mesh, keys,
                                  len(data.rows[split]))
        records += prediction_records(data.rows[split], predictions, split)
    if not sharding.is_main_process():
        # The other hosts took part in the (collective) evaluation only; they return when the
        # report is on disk (a distillation's student reads the teacher's best_model next).
        sharding.barrier("training report")
        return out_dir
    extra = tuple(config.report.get("metrics", ())) + (
        () if early["monitor"] == metrics_lib.LOSS else (early["monitor"],))
    out = write_report(records, out_dir, color_by=config.report.color_by,
                       num_examples=int(config.report.num_example_predictions), metrics=extra)
    # The run's whole config (seed included): a report folder copied away still says what
    # made it.
    summary = {"best_step": early["best_step"], "best_valid_loss": early["best_valid_loss"],
               "monitor": early["monitor"], "best_value": early["best_value"],
               "stopped_early": early["stopped"], "mode": data.mode,
               "encoder_checkpoint": config.model.get("encoder_checkpoint"),
               "seed": int(config.seed), "config": cfglib.to_dict(config)}
    (out / "training.json").write_text(
        json.dumps(metrics_lib.json_safe(summary), indent=2, sort_keys=True) + "\n")
    write_split_manifest(data.rows, out / SPLIT_MANIFEST)
    metrics_file = out.parent / METRICS_FILE
    if metrics_file.is_file():
        from haaqi_jax.train.curves import learning_curves
        learning_curves(metrics_file, out / CURVES_FILE, title=str(out.parent.name))
    # A HAAQINet directory: the frozen encoder of the run + the best trained params.
    full = dict(net.params)
    full.update(jax.device_get(params))
    HAAQINet(net.config, full).save(
        out / "best_model", overwrite=True,
        extra={"best_step": early["best_step"], "best_valid_loss": early["best_valid_loss"],
               "monitor": early["monitor"], "best_value": early["best_value"]})
    sharding.barrier("training report")
    return out
