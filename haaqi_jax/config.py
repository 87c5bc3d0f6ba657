"""The one config type of haaqi_jax: `ml_collections.ConfigDict`, plus the few helpers around it.

A config file is a Python file with `get_config() -> ConfigDict` (big_vision / flax examples
style). Command lines change it with `--set a.b=c` overrides, which are type checked against the
value already in the config (so a typo or a wrong type fails loudly, naming the key); the run then
freezes it and saves it as JSON beside its outputs.

    cfg = load_config_file("configs/default.py")
    cfg = apply_overrides(cfg, ["train.num_epochs=3", "model.encoder_checkpoint=/ckpt/beats"])
    save_config(cfg, workdir / "config.json")
    cfg = freeze(cfg)

Optional fields use `ml_collections.config_dict.placeholder(type)`: None until set, and then
checked against that type.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

import ml_collections
from ml_collections import config_dict

ConfigDict = ml_collections.ConfigDict
FrozenConfigDict = ml_collections.FrozenConfigDict

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def definition_site(fn: Any) -> tuple:
    """Where a function is defined: module, qualified name, source file and line. Registries
    (losses, encoders) take a second registration of the same definition as a no-op, so that a
    config file that registers one can be loaded twice; two config files of one name in
    different folders (runs/a/config.py, runs/b/config.py) load as the same module name, so the
    file tells their functions apart, and the line two lambdas of one function."""
    code = getattr(fn, "__code__", None)
    return (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None),
            None if code is None else os.path.abspath(code.co_filename),
            None if code is None else code.co_firstlineno)


def nearest_key_hint(key: str, known, prefix: str = "") -> str:
    """`key` with " (did you mean <prefix><nearest>?)" when a known key is close to it."""
    near = difflib.get_close_matches(key, sorted(known), n=1)
    return prefix + key + (f" (did you mean {prefix}{near[0]}?)" if near else "")


def unknown_keys_message(unknown, known, owner: str) -> str:
    """'unknown keys a (did you mean b?), c for OWNER (known: ...)': one line that names every
    unknown key with its nearest known one."""
    named = ", ".join(nearest_key_hint(k, known) for k in sorted(unknown))
    return (f"unknown key{'s' if len(unknown) > 1 else ''} {named} for {owner} "
            f"(known: {', '.join(sorted(known))})")


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (to Python, True is the int 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_whole(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_fraction(value: Any, key: str, note: str = "") -> float:
    """`value` as a float; ValueError naming `key` (and `note`, e.g. what 0 means) unless it is
    a number in [0, 1): the range of decays, dropout rates and held-back fractions."""
    if not is_number(value) or not 0 <= value < 1:
        raise ValueError(f"{key} must be a number in [0, 1){f' ({note})' if note else ''}, "
                         f"got {value!r}")
    return float(value)


def reject_unknown_keys(d: Any, cls: type) -> None:
    """Raises ValueError naming the keys of mapping `d` that are not fields of dataclass `cls`
    (and the known ones): the one check behind the frozen config dataclasses' from_dict."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown} (known: {', '.join(known)})")


#: Every key a training or distillation run reads, by section ("" is the top level). A config
#: may leave out a key its run does not use, never add one: a misspelt key (`num_epoch`) would
#: otherwise leave the default in force without a word. The values of `model.encoder_config` and
#: `model.head` are checked by the encoder's and the head's own config types, those under a
#: `kwargs` section by the loss they belong to, and `distill.teacher` is a run config itself.
RUN_KEYS: dict[str, frozenset[str]] = {
    "": frozenset({"seed", "data", "model", "loss", "optimizer", "train", "report", "distill"}),
    "data": frozenset({
        "manifest", "demo_dir", "demo_clips", "demo_seed", "demo_seconds", "demo_label_batch",
        "train_split", "valid_split", "eval_splits", "hold_out", "cache", "cache_dir",
        "cache_dtype", "encode_batch_size", "valid_fraction", "crop_seconds", "prefetch",
        "bucket_pool"}),
    "model": frozenset({
        "encoder_kind", "encoder_config", "encoder_checkpoint", "head_checkpoint",
        "feature_mode", "feature_layers", "freeze_encoder", "head", "dtype"}),
    "loss": frozenset({"name", "kwargs"}),
    "optimizer": frozenset({
        "name", "learning_rate", "schedule", "warmup_steps", "grad_clip_norm", "weight_decay",
        "b1", "b2", "momentum", "loss_params_learning_rate"}),
    "train": frozenset({
        "batch_size", "eval_batch_size", "num_epochs", "patience", "min_delta",
        "checkpoint_every_steps", "log_every_steps", "frozen_patterns", "stop_after_steps",
        "progress", "write_report", "ema_decay", "monitor"}),
    "report": frozenset({"color_by", "num_example_predictions", "metrics"}),
    "distill": frozenset({
        "teacher_checkpoint", "teacher", "student_layers", "target_layers", "head_kind",
        "shared_position_bias", "feature_mode", "head_init", "frozen_head", "timing_seconds",
        "timing_repeats", "cache_targets", "target_cache_dir", "target_cache_dtype"}),
}
#: The sections every run reads (configs/default.py's get_config() has them all).
RUN_SECTIONS = ("data", "model", "loss", "optimizer", "train", "report")


def check_run_keys(cfg: Any) -> None:
    """ValueError when a run config (or its `distill.teacher`) lacks a section `RUN_SECTIONS`
    names, holds a section that is not a mapping, or has keys `RUN_KEYS` does not know: all of
    them named in one message, each with its nearest known key.

    Args:
      cfg: the run config (a ConfigDict or a dict).
    """
    unknown = _unknown_run_keys(cfg, "")
    if unknown:
        raise ValueError(f"config: unknown key{'s' if len(unknown) > 1 else ''} "
                         f"{'; '.join(unknown)}. No part of a run reads "
                         f"{'them' if len(unknown) > 1 else 'it'}, so the value would be "
                         f"ignored (the keys of each section: haaqi_jax.config.RUN_KEYS)")


def _unknown_run_keys(cfg: Any, where: str) -> list[str]:
    """The unknown keys of run config `cfg` and of its distill.teacher, `where` prefixed."""
    missing = [where + s for s in RUN_SECTIONS if s not in cfg]
    if missing:
        raise ValueError(f"config: no section {', '.join(missing)}; a run reads "
                         f"{', '.join(RUN_SECTIONS)} (start from configs/default.py's "
                         f"get_config())")
    unknown = []
    for section, known in RUN_KEYS.items():
        if section and section not in cfg:
            continue
        node = cfg[section] if section else cfg
        prefix = where + (section + "." if section else "")
        if not hasattr(node, "keys"):
            raise ValueError(f"config {prefix.rstrip('.')}: a section of keys, got "
                             f"{type(node).__name__} {node!r}")
        unknown += [nearest_key_hint(key, known, prefix)
                    for key in sorted(set(node.keys()) - known)]
    teacher = cfg["distill"].get("teacher") if "distill" in cfg else None
    if teacher is not None:
        unknown += _unknown_run_keys(teacher, where + "distill.teacher.")
    return unknown


def load_config_file(path: str | os.PathLike) -> ConfigDict:
    """Imports a Python config file and returns its `get_config()` (a fresh, mutable ConfigDict).

    As for a Python script, the file's own folder is first on sys.path while it is imported, so
    that it can import a module beside it (e.g. one that registers your losses); sys.path is
    restored afterwards.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_haaqi_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.absolute().parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.absolute().parent))   # the first copy: the one put there
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, ConfigDict):
        raise ValueError(f"config file {path}: get_config() returned {type(cfg).__name__}, "
                         "expected ml_collections.ConfigDict")
    return cfg


def _parse_bool(key: str, text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"config override {key}={text!r}: expected a bool (true/false)")


def _parse_literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string


class _NotALiteral(Exception):
    """A tuple field's text that looks like a tuple but does not parse as one."""


def parse_value(key: str, text: str, expected: type | None, optional: bool = True) -> Any:
    """Parses the text of an override for a field whose current type is `expected`.

    None as `expected` (a field that is None and not a typed placeholder) accepts any Python
    literal, else the text as a string; a str field takes a quoted string as the string inside.
    "none"/"None"/"null" clears an `optional` field (a placeholder, or a loss keyword); an empty
    text is refused (an unset shell variable would otherwise leave a path empty, which reads as
    no path). A tuple field also takes bare comma-separated items
    (`data.eval_splits=valid,test_seen`).
    """
    if not text.strip():
        raise ValueError(f"config override {key}={text!r}: no value (None clears an optional "
                         f"field, () empties a tuple)")
    if text.strip() in ("None", "none", "null"):
        if not optional:
            raise ValueError(f"config override {key}={text!r}: {key} is not optional (expected "
                             f"a value of type {expected.__name__})")
        return None
    if expected is None or expected is type(None):
        low = text.strip()   # true / false spell a bool here too (as a literal, "false" is a str)
        return (low == "true") if low in ("true", "false") else _parse_literal(text)
    try:
        if expected is bool:
            return _parse_bool(key, text)
        if expected is int:
            value = _parse_literal(text)
            if not is_whole(value):
                raise ValueError
            return value
        if expected is float:
            value = _parse_literal(text)
            if not is_number(value):
                raise ValueError
            return float(value)
        if expected is str:
            # 'a b' or "a b" (a Python string literal, as a tuple's items are quoted) is the
            # string inside; any other text is the string itself
            value = _parse_literal(text.strip()) if text.strip()[:1] in "'\"" else text
            return value if isinstance(value, str) else text
        if expected in (tuple, list):
            value = _parse_literal(text)
            if isinstance(value, str) and text.strip()[:1] in "([":
                raise _NotALiteral
            if isinstance(value, str) and text.strip()[:1] not in "'\"":
                # a bare a,b lists items; a bare "a b" would be one item with a space
                if "," in value:
                    value = tuple(item.strip() for item in value.split(",") if item.strip())
                elif len(value.split()) > 1:
                    raise ValueError(f"config override {key}={text!r}: separate the items "
                                     f"with commas, e.g. {key}={','.join(value.split())}")
            if isinstance(value, (int, float, str)):
                value = (value,)  # "a.b=3" on a tuple field means a 1-tuple
            if not isinstance(value, (tuple, list)):
                raise ValueError
            return expected(value)
    except _NotALiteral:
        raise ValueError(f"config override {key}={text!r}: not a Python literal; quote the "
                         f"strings inside, e.g. {key}='(\"a\", \"b\")'") from None
    except ValueError as err:
        if err.args and str(err.args[0]).startswith("config override"):
            raise                                   # already names the key and the fix
        raise ValueError(f"config override {key}={text!r}: expected a value of type "
                         f"{expected.__name__}") from None
    raise ValueError(f"config override {key}={text!r}: fields of type {expected.__name__} "
                     "cannot be set from the command line")


def _field_type(cfg: ConfigDict, name: str) -> type | None:
    value = cfg[name]
    if isinstance(value, ConfigDict):
        return ConfigDict
    try:
        return cfg.get_type(name)
    except (AttributeError, KeyError):
        return None if value is None else type(value)


#: Sections named so (`loss.kwargs`, a distillation term's `kwargs`) accept new keys from
#: overrides: they are keyword arguments of a loss picked by name, which checks them itself.
OPEN_SECTION = "kwargs"
#: A section named so (`model.encoder_config`, and sections inside it) accepts new keys from
#: overrides too: any key of the encoder kind's config, which `model.resolve_encoder_config`
#: checks (name and type) before the run, whatever keys the config file listed.
ENCODER_SECTION = "encoder_config"


def _typed_items(key: str, text: str, value: tuple | list, current: Any) -> tuple | list:
    """`value` with the item type of the field's current non-empty tuple of ints or floats (an
    int for a float), else ValueError naming the key: (1.5,) for layers would be int()-ed to
    layer 1."""
    kinds = {type(item) for item in current or ()}
    if len(kinds) != 1 or not kinds <= {int, float}:
        return value                        # empty, mixed or not numbers: taken as given
    kind = kinds.pop()
    if not all(is_number(item) and (kind is float or isinstance(item, int)) for item in value):
        raise ValueError(f"config override {key}={text!r}: expected a tuple of "
                         f"{kind.__name__}, e.g. {key}={','.join(map(str, current))}")
    return type(value)(kind(item) for item in value)


def _unknown_key(key: str, name: str, parents: list[str], node: ConfigDict) -> ValueError:
    """"config override 'KEY': unknown key NAME under SECTION (did you mean ...?) (known: ...)"."""
    where = ".".join(parents) or "<top>"
    near = difflib.get_close_matches(name, sorted(node.keys()), n=1)
    hint = f" (did you mean {'.'.join(parents + near)}?)" if near else ""
    return ValueError(f"config override {key!r}: unknown key {name!r} under {where}{hint} "
                      f"(known: {sorted(node.keys())})")


def apply_overrides(cfg: ConfigDict, overrides: Iterable[str]) -> ConfigDict:
    """Applies `a.b.c=value` overrides in place and returns cfg.

    A key may be added only under a section named `kwargs` or in `model.encoder_config` (its
    value is read as a Python literal, true / false as a bool; the loss or the encoder's config
    checks it), and under `kwargs` a whole section may also be replaced by a literal (a dict,
    or a loss name); everywhere else the key must exist.

    Raises:
      ValueError naming the key when an override is malformed, names a key the config does not
      have, or gives a value of the wrong type.
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        *parents, leaf = key.split(".")
        node = cfg
        for depth, name in enumerate(parents):
            if name in node and not isinstance(node[name], ConfigDict):
                raise ValueError(f"config override {key!r}: {'.'.join(parents[:depth + 1])} is "
                                 f"not a section (it is {node[name]!r})")
            if name not in node:
                raise _unknown_key(key, name, parents[:depth], node)
            node = node[name]
        if leaf not in node:
            if (parents and parents[-1] == OPEN_SECTION) or ENCODER_SECTION in parents:
                # A loss's keywords are its own (checked by losses.get_loss), an encoder's
                # settings its config's (model.resolve_encoder_config).
                node[leaf] = parse_value(key, text, None)
                continue
            raise _unknown_key(key, leaf, parents, node)
        expected = _field_type(node, leaf)
        if expected is ConfigDict and OPEN_SECTION in parents + [leaf]:
            # Inside a loss's keywords a whole sub-spec may be replaced, e.g. to switch the
            # distillation term: loss.kwargs.distill='{"name": "mse"}', or a bare name.
            value = parse_value(key, text, None)
            if leaf == OPEN_SECTION and not (value is None or isinstance(value, dict)):
                raise ValueError(f"config override {key}={text!r}: a loss's keywords are a "
                                 f"dict, e.g. {key}='{{\"weight\": 0.5}}' (or {{}} for none)")
            del node[leaf]
            node[leaf] = ConfigDict(value) if isinstance(value, dict) else value
            continue
        if expected is ConfigDict:
            raise ValueError(f"config override {key!r}: {key} is a section; set one of its "
                             f"keys {sorted(node[leaf].keys())}")
        # None clears a placeholder (a FieldReference) or a loss keyword, not a bool or a
        # count: a run would read it as false (or fail late), and the field would lose its type.
        # (ConfigDict keeps a placeholder as a FieldReference in _fields: no public test.)
        optional = (node[leaf] is None or OPEN_SECTION in parents
                    or isinstance(node._fields[leaf], config_dict.FieldReference))
        # A loss keyword's numbers are typed by the loss (losses.check_loss_config), not by
        # the value it held: layer_weights (1, 2, 3) may become (0.5, 1, 1), 1 become 0.5.
        retype = bool(parents) and parents[-1] == OPEN_SECTION and expected in (int, tuple, list)
        value = parse_value(key, text, None if retype and expected is int else expected,
                            optional)
        if retype:
            del node[leaf]
        elif isinstance(value, (tuple, list)):
            value = _typed_items(key, text, value, node[leaf])
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(f"config override {key}={text!r}: {e}") from None
    return cfg


def check_distinct_overrides(overrides: Iterable[str]) -> None:
    """Refuses a command line that gives one key twice (ValueError naming both values).

    `apply_overrides` applies its list in order (Python callers compose lists); on a command
    line a second `--set` of the same key is usually a slip whose value would silently win.
    """
    given: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            continue                    # apply_overrides names the malformed one
        key, text = (part.strip() for part in item.split("=", 1))
        if key in given:
            raise ValueError(f"--set {key} is given twice ({key}={given[key]} and "
                             f"{key}={text}); give it once")
        given[key] = text


def freeze(cfg: ConfigDict) -> FrozenConfigDict:
    """An immutable, hashable copy (safe to close over in jitted functions)."""
    return FrozenConfigDict(cfg)


def to_dict(cfg: ConfigDict | FrozenConfigDict) -> dict[str, Any]:
    """Plain nested dict with tuples as lists (JSON-able)."""
    def plain(x):
        if isinstance(x, (ConfigDict, FrozenConfigDict, dict)):
            return {k: plain(v) for k, v in (x.items())}
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        if isinstance(x, config_dict.FieldReference):
            return plain(x.get())
        return x
    return plain(cfg)


def save_config(cfg: ConfigDict | FrozenConfigDict, path: str | os.PathLike) -> Path:
    """Writes the config as indented, key-sorted JSON (the record saved beside every run)."""
    from haaqi_jax.files import write_atomic
    # atomic: other hosts may be reading it
    return write_atomic(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


#: Dotted keys (fnmatch patterns) that may change when a run is resumed: they steer the loop
#: (length, logging, progress, reporting), not what one step computes. The same keys of a
#: distillation's teacher config (distill.teacher.*) are resumable too.
_LOOP_KEYS = ("train.num_epochs", "train.patience", "train.stop_after_steps", "train.progress",
              "train.write_report", "train.checkpoint_every_steps", "train.log_every_steps",
              "report.*", "data.prefetch", "data.eval_splits")
RESUMABLE_KEYS = _LOOP_KEYS + ("distill.timing_*",) + tuple(f"distill.teacher.{k}"
                                                            for k in _LOOP_KEYS)
#: Keys added to the configs after runs were saved without them, with the value those runs
#: used implicitly: a saved config that lacks one counts as having that value.
IMPLICIT_VALUES = {
    **{f"{where}model.{key}": value for where in ("", "distill.teacher.")
       for key, value in (("head.readout", "score"), ("head_checkpoint", None),
                          ("head.lstm_layers", 1), ("head.lstm_dropout_rate", 0.0),
                          ("dtype", "float32"))},
    "train.ema_decay": 0.0,
    # (before train.monitor, early stopping and the best checkpoint followed the valid loss)
    **{f"{where}train.monitor": "loss" for where in ("", "distill.teacher.")},
    # (before report.metrics, a report had LCC, SRCC and MSE only)
    **{f"{where}report.metrics": () for where in ("", "distill.teacher.")}}


#: Keys that name a file or folder (also under distill.teacher.). A resume compares them as the
#: paths they name from the current folder, so "data/m.jsonl", "./data/m.jsonl" and its absolute
#: spelling (or a folder with and without a trailing "/") are one setting, not another config.
PATH_KEYS = ("data.manifest", "data.demo_dir", "data.cache_dir", "model.encoder_checkpoint",
             "model.head_checkpoint", "distill.teacher_checkpoint", "distill.target_cache_dir")


def _same_setting(key: str, a: Any, b: Any) -> bool:
    """a == b, or, for a `PATH_KEYS` key, two spellings of one path."""
    if a == b:
        return True
    bare = key[len("distill.teacher."):] if key.startswith("distill.teacher.") else key
    if bare in PATH_KEYS and isinstance(a, str) and isinstance(b, str) and a and b:
        return os.path.abspath(a) == os.path.abspath(b)   # (readers do not expand "~")
    return False


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested `to_dict` config as {dotted key: leaf value}."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(saved: dict[str, Any], new: dict[str, Any],
                       ignore: Iterable[str] = RESUMABLE_KEYS) -> list[str]:
    """Dotted keys whose values differ between two `to_dict` configs, as "key: old -> new"
    (a key missing on one side shows as <absent>, or as its `IMPLICIT_VALUES` entry on the
    saved side; `PATH_KEYS` compared as the paths they name), skipping keys that match
    `ignore`."""
    import fnmatch
    old, cur = flatten(saved), flatten(new)
    out = []
    for key in sorted(set(old) | set(cur)):
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in ignore):
            continue
        a, b = old.get(key, IMPLICIT_VALUES.get(key, "<absent>")), cur.get(key, "<absent>")
        if not _same_setting(key, a, b):
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def holds_a_run(workdir: str | os.PathLike) -> bool:
    """True when `workdir` has checkpoints or a report: a run that a rerun would resume."""
    workdir = Path(workdir)
    return any((workdir / d).is_dir() and any((workdir / d).iterdir())
               for d in ("checkpoints", "report"))


def resumable_keys(config: dict[str, Any]) -> tuple[str, ...]:
    """RESUMABLE_KEYS less those this config fixes: with a cosine learning-rate schedule the
    schedule's length is train.num_epochs x steps per epoch, so another epoch count would
    change the learning rate of every remaining step."""
    flat = flatten(config)
    fixed = {prefix + "train.num_epochs" for prefix in ("", "distill.teacher.")
             if flat.get(prefix + "optimizer.schedule", "constant") != "constant"}
    return tuple(k for k in RESUMABLE_KEYS if k not in fixed)


def save_run_config(cfg: ConfigDict | FrozenConfigDict, workdir: str | os.PathLike,
                    name: str = "config.json", *, write: bool = True) -> Path:
    """Writes a run's config.json, refusing a workdir that holds another run's checkpoints.

    Resuming a run with a different model, data or optimiser would mix two runs (or stop later
    on a data-iterator mismatch), so when `workdir` already has checkpoints or a report and its
    saved config differs outside `resumable_keys` this raises ValueError naming the keys. Every
    host of a multi-host run should call it (so that all stop alike), with `write` true on one.
    """
    from haaqi_jax.files import read_json
    workdir = Path(workdir)
    path = workdir / name
    if holds_a_run(workdir):
        if not path.is_file():
            raise ValueError(f"{workdir} holds a run (checkpoints or a report) but no {name}: "
                             f"whether this config is the one it was made with cannot be "
                             f"checked. Restore {path}, pass another --workdir, or delete "
                             f"{workdir} to start over.")
        new = to_dict(cfg)
        diffs = config_differences(read_json(path, "the run's config"), new,
                                   ignore=resumable_keys(new))
        if diffs:
            shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6
                                             else "")
            fixed = [k for k in set(RESUMABLE_KEYS) - set(resumable_keys(new))
                     if any(d.startswith(k + ":") for d in diffs)]
            schedule = fixed and flatten(new).get(fixed[0].replace("train.num_epochs",
                                                                   "optimizer.schedule"))
            why = (f" ({fixed[0]} sets the length of the {schedule} learning-rate schedule, so "
                   f"it cannot change on a resume)" if fixed else "")
            raise ValueError(f"{workdir} holds a run made with another config ({shown}){why}. "
                             f"Resuming it would mix the two runs: pass another --workdir, or "
                             f"delete {workdir} to start over.")
    return save_config(cfg, path) if write else path


def load_config_json(path: str | os.PathLike) -> ConfigDict:
    """Reads a config saved by `save_config` (lists stay lists)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config JSON {path} does not exist")
    from haaqi_jax.files import read_json
    return ConfigDict(read_json(path, "a saved config"))


def get_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> ConfigDict:
    """`load_config_file` + `apply_overrides` in one call."""
    return apply_overrides(load_config_file(path), overrides)
