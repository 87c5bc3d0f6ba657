"""`haaqi-jax compare`: one table of several runs' scores, with their mean and spread.

    haaqi-jax compare runs/seed0 runs/seed1 runs/seed2 [--splits test_unseen valid]
        [--metric max_error] [--out comparison.md]

On the demo set one training run moves by up to 0.03 LCC when its labels move by at most 2.4e-4
(see the README), so a setting is judged on several seeds. Each argument is a training workdir (its
`report/metrics.json`), a report folder of `haaqi-jax evaluate` (its `metrics.json`) or a
metrics.json itself. For every split (and "all"), the table lists each run's LCC, SRCC and MSE,
then their mean, sample standard deviation and range over the runs.

Metrics of your own: `--metric NAME` (repeatable) adds a column after MSE of the reports' NAME
(which `evaluate --metric NAME` or a run's report.metrics put in every entry of metrics.json),
read from the files (no registry needed), summarised as the scores are. A run whose report
lacks it, or has null there (undefined), reads n/a, a note names it, and the summary covers
the others (a note says so); a NAME no run has is an error.

Settings: training workdirs (with the config.json that train.py writes) whose configs differ
only in `seed` (and in keys that steer logging and reporting only, `REPEAT_KEYS`) form one
setting, and the mean, sd and range are taken per setting: three seeds each of two distillation
losses give two summaries, not one over six runs. Paths (`config.PATH_KEYS`) are compared in
their normal spelling: "data_cache/demo", "./data_cache/demo" and "data_cache/demo/" are one
setting (but not an absolute spelling of it). Runs without a config (evaluate reports) form
a setting of their own. The settings are listed above the table by the keys that tell them
apart. A split whose runs in one setting cover other clips (another number of clips, or an
"all" over other `data.eval_splits`) gets no summary, and a note says so.

Distillation: a workdir with `distill_report.json` (train.py --config configs/distill*.py) also
gets a row per split in a second table: teacher and student LCC / SRCC, the LCC gap, the
student's inference time as a fraction of the teacher's and its encoder's parameter reduction.

A path without a readable report is named and skipped; the others are still compared. `--out
X.md` also writes the numbers as `X.csv` (and `X.distill.csv`) and `X.png`: each split's LCC per
run, with each setting's mean and sd (an --out without a .md suffix gets them appended).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from haaqi_jax.files import read_json

#: Scores tabulated per run and split, in table order.
SCORES = ("lcc", "srcc", "mse")
#: How the table heads them.
SCORE_NAMES = {"lcc": "LCC", "srcc": "SRCC", "mse": "MSE"}
#: Keys of every table row besides the scores: a metric of your own may not take them.
ROW_KEYS = ("split", "setting", "run", "n")
#: Name of the whole-report entry ("overall" in metrics.json).
ALL = "all"
#: Summary rows of each setting, in table order.
SUMMARIES = ("mean", "sd", "range")
#: Config keys (fnmatch patterns) that vary between repeats of one setting: the seed, and what
#: steers logging and reporting only (not train.num_epochs or patience: they change results).
REPEAT_KEYS = tuple(prefix + key for prefix in ("", "distill.teacher.") for key in (
    "seed", "train.progress", "train.write_report", "train.checkpoint_every_steps",
    "train.log_every_steps", "report.*", "data.prefetch", "data.eval_splits")) + (
    "distill.timing_*",)
#: What train.py writes beside a run's report (loop.CONFIG_FILE, distill.REPORT_FILE; named
#: here so that `compare` stays a light numpy-only module).
CONFIG_FILE = "config.json"
DISTILL_REPORT_FILE = "distill_report.json"


def metrics_path(path: str | os.PathLike) -> Path:
    """The metrics.json a run argument points to: the file itself, `<dir>/metrics.json`, or a
    workdir's `<dir>/report/metrics.json`. FileNotFoundError names what was looked for."""
    path = Path(path)
    candidates = [path] if path.suffix == ".json" else [path / "metrics.json",
                                                       path / "report" / "metrics.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no report found (looked for "
                            f"{', '.join(str(c) for c in candidates)})")


def check_metric_names(metrics: Any, what: str = "metric") -> tuple[str, ...]:
    """The metrics of your own that `metrics` (names of report entry keys, e.g. those of
    `evaluate --metric`) adds to lcc, srcc and mse: each once, in order, the built-ins left
    out (every table has them). ValueError naming `what` for a name of a table column
    (ROW_KEYS) or for `metrics` that is not a list of names."""
    from haaqi_jax.train.metrics import own_metric_names   # (numpy only: no jax here)
    names = own_metric_names(metrics, what)
    for name in names:
        if name in ROW_KEYS:
            raise ValueError(f"{what} {name}: {name!r} is a column of every table, not a metric")
    return names


def read_scores(path: str | os.PathLike, metrics: Sequence[str] = ()
                ) -> dict[str, dict[str, float]]:
    """{split or "all": {"lcc", "srcc", "mse", "n", and each of `metrics` the entry has}} of
    one report (NaN where it is null).

    Args:
      metrics: metrics of your own to read as well (`check_metric_names`); an entry without
        one is left without it (`compare` shows n/a and `missing_metrics` names it).
    Raises:
      FileNotFoundError / ValueError naming the file when it is missing, not JSON, or lacks
      the "overall" entry or a score, or a metric's value is not a number or null.
    """
    metrics = check_metric_names(metrics)
    file = metrics_path(path)
    report = read_json(file)
    if not isinstance(report, Mapping) or "overall" not in report:
        raise ValueError(f"{file}: no 'overall' entry; is it a haaqi_jax metrics.json?")
    by_split = report.get("by_split") or {}
    if not isinstance(by_split, Mapping):
        raise ValueError(f"{file}: 'by_split' is not an object of splits")
    entries = {ALL: report["overall"], **by_split}
    scores = {}
    for name, entry in entries.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"{file}: entry {name!r} is not an object of scores")
        missing = [k for k in SCORES + ("n",) if k not in entry]
        if missing:
            raise ValueError(f"{file}: entry {name!r} has no {missing[0]!r}")
        wrong = [k for k in SCORES if not _is_number(entry[k])]
        if wrong:
            raise ValueError(f"{file}: entry {name!r} has {wrong[0]} = {entry[wrong[0]]!r}; "
                             f"expected a number or null")
        if not _is_number(entry["n"]) or entry["n"] is None:
            raise ValueError(f"{file}: entry {name!r} has n = {entry['n']!r}; expected the "
                             f"number of clips it scored")
        scores[name] = {k: _number(entry[k]) for k in SCORES + ("n",)}
        n = scores[name]["n"]
        if not (math.isfinite(n) and n >= 0 and n == int(n)):
            raise ValueError(f"{file}: entry {name!r} has n = {entry['n']!r}; expected the "
                             f"number of clips it scored")
        for k in metrics:
            if k not in entry:
                continue
            if entry[k] is not None and (isinstance(entry[k], bool)
                                         or not isinstance(entry[k], (int, float))):
                raise ValueError(f"{file}: entry {name!r} has {k} = {entry[k]!r}; expected "
                                 f"a number or null")
            scores[name][k] = _number(entry[k])
    return scores


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)   # json_safe writes NaN as null


def _is_number(value: Any) -> bool:
    """A number or null (NaN) in a report; true / false are no numbers."""
    from haaqi_jax.config import is_number   # (no jax: compare imports none)
    return value is None or is_number(value)


def compare(runs: Mapping[str, Mapping[str, Mapping[str, float]]],
            splits: Sequence[str] | None = None,
            settings: Mapping[str, Sequence[str]] | None = None,
            metrics: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Table rows: per split and setting, one row per run, then "mean", "sd" and "range".

    Args:
      runs: {run name: `read_scores` output (read with `metrics`)}, in table order.
      splits: splits to keep (default: every split any run has, "all" first, then sorted).
      settings: {setting label: [run names]} (see `group_settings`), in table order; default
        one setting "" of all runs.
      metrics: metrics of your own (keys of the report entries, `check_metric_names`) tabulated
        after MSE and summarised as the scores are.
    Returns:
      [{"split", "setting", "run", "n", "lcc", "srcc", "mse", *metrics}]; the summary rows have
      n = number of the setting's runs that have the split, "sd" is the sample standard
      deviation (NaN for a single run) and "range" holds (min, max) pairs. A metric's value is
      None in the row of a run whose entry lacks it, NaN where it is null; both are left out
      of the summary (`left_out`, `missing_metrics` say so). Splits missing from a run are
      left out of its rows; a split whose runs in one setting cover other clips (another n,
      or an "all" over other splits) gets no summary rows (`unsummarised` names them).
    Raises:
      ValueError naming a requested split or metric that no run has, or a run in no setting.
    """
    metrics = check_metric_names(metrics)
    unknown = [m for m in metrics
               if not any(m in entry for scores in runs.values() for entry in scores.values())]
    if unknown:
        raise ValueError(f"no run has metric {unknown[0]!r} (a report has a metric of your own "
                         f"when `evaluate --metric` or report.metrics named it)")
    present = sorted({s for scores in runs.values() for s in scores} - {ALL})
    present = ([ALL] if any(ALL in s for s in runs.values()) else []) + present
    if splits is None:
        splits = present
    unknown = [s for s in splits if s not in present]
    if unknown:
        raise ValueError(f"no run has split {unknown[0]!r} (splits: {present})")
    settings = {"": list(runs)} if settings is None else settings
    orphans = set(runs) - {name for names in settings.values() for name in names}
    if orphans:
        raise ValueError(f"compare: runs {sorted(orphans)} belong to no setting")
    rows: list[dict[str, Any]] = []
    for split in splits:
        for setting, names in settings.items():
            have = {name: runs[name][split] for name in names if split in runs[name]}
            if not have:
                continue
            rows += [{"split": split, "setting": setting, "run": name,
                      **{k: entry[k] for k in SCORES + ("n",)},
                      **{k: entry.get(k) for k in metrics}} for name, entry in have.items()]
            if _unpooled(runs, list(have), split) is None:
                rows += _summary_rows(have, split, setting, SCORES + metrics)
    return rows


def _unpooled(runs: Mapping[str, Mapping[str, Mapping[str, float]]], names: Sequence[str],
              split: str) -> str | None:
    """Why these runs' scores on `split` are not averaged (they cover other clips), or None."""
    counts = sorted({int(runs[name][split]["n"]) for name in names})
    if len(counts) > 1:
        return f"the runs scored different numbers of clips ({', '.join(map(str, counts))})"
    if split == ALL and len({frozenset(runs[name]) for name in names}) > 1:
        return "the runs' 'all' pools different splits"
    return None


def _run_rows(rows: Sequence[Mapping[str, Any]]
              ) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """The per-run rows of `compare` (not its summaries) by (split, setting), in row order."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["run"] not in SUMMARIES:
            groups.setdefault((row["split"], row.get("setting", "")), []).append(row)
    return groups


def unsummarised(runs: Mapping[str, Mapping[str, Mapping[str, float]]],
                 rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Notes on the (split, setting) groups of `compare` rows that got no summary rows, and
    why (`_unpooled`)."""
    notes = []
    for (split, setting), group in _run_rows(rows).items():
        reason = _unpooled(runs, [row["run"] for row in group], split)
        if reason is not None:
            notes.append(f"split {split!r}{f', setting {setting}' if setting else ''}: {reason}, "
                         f"so no mean, sd or range")
    return notes


def _defined(value: float | None) -> bool:
    """False for a score that is undefined (NaN) or not in the run's report (None)."""
    return value is not None and math.isfinite(value)


def left_out(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = ()) -> list[str]:
    """Notes on summaries that leave runs out: a run whose score (or one of `metrics`) is
    undefined (n/a, e.g. the correlations of constant predictions) or not in its report is
    not averaged, so its setting's mean, sd and range cover fewer runs than the "n runs" of
    its row says."""
    summarised = {(row["split"], row.get("setting", "")) for row in rows
                  if row["run"] in SUMMARIES}
    notes = []
    for (split, setting), group in _run_rows(rows).items():
        if (split, setting) not in summarised:
            continue
        # {(undefined runs, runs whose report lacks it): score names}
        by_runs: dict[tuple[tuple[str, ...], tuple[str, ...]], list[str]] = {}
        for k in SCORES + tuple(metrics):
            undefined = tuple(row["run"] for row in group
                              if row.get(k) is not None and not _defined(row[k]))
            absent = tuple(row["run"] for row in group if row.get(k) is None)
            if undefined or absent:
                by_runs.setdefault((undefined, absent), []).append(SCORE_NAMES.get(k, k))
        for (undefined, absent), scores in by_runs.items():
            others = len(group) - len(undefined) - len(absent)
            if not others:              # no run left: the summary itself shows n/a
                continue
            why = ([f"undefined for {', '.join(undefined)}"] if undefined else []) + (
                [f"not in the report{'s' if len(absent) > 1 else ''} of {', '.join(absent)}"]
                if absent else [])
            notes.append(f"split {split!r}{f', setting {setting}' if setting else ''}: "
                         f"{' and '.join(scores)} {'is' if len(scores) == 1 else 'are'} "
                         f"{' and '.join(why)}; "
                         f"{'its' if len(scores) == 1 else 'their'} mean, sd and range cover "
                         f"the other {others} run{'s' if others != 1 else ''}")
    return notes


def missing_metrics(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[str]:
    """Notes naming each run whose report lacks one of `metrics` in some of the `compare` rows'
    splits (its cells read n/a): a report written without that metric, or another metric's."""
    lacking: dict[tuple[str, str], list[str]] = {}       # (run, metric) -> splits
    shown: dict[str, list[str]] = {}                    # run -> its splits in the rows
    for row in rows:
        if row["run"] in SUMMARIES:
            continue
        shown.setdefault(row["run"], []).append(row["split"])
        for k in metrics:
            if row.get(k) is None:
                lacking.setdefault((row["run"], k), []).append(row["split"])
    notes = []
    for (run, k), splits in lacking.items():
        where = ("" if splits == shown[run]
                 else f" for split{'s' if len(splits) > 1 else ''} "
                      f"{', '.join(repr(s) for s in splits)}")
        notes.append(f"{run}: its report has no {k}{where} (n/a in the table; a report has it "
                     f"when `evaluate --metric {k}` or report.metrics named it)")
    return notes


def _summary_rows(have: Mapping[str, Mapping[str, float]], split: str, setting: str,
                  keys: Sequence[str] = SCORES) -> list[dict[str, Any]]:
    """The "mean", "sd" and "range" rows of `keys` over the runs' entries `have`."""
    # A run whose score is undefined (e.g. a correlation over one clip) or not in its report
    # is left out of that score's summary instead of turning it into NaN.
    values = {k: np.asarray([v for v in (entry.get(k) for entry in have.values())
                             if _defined(v)]) for k in keys}
    head = {"split": split, "setting": setting, "n": len(have)}
    return [
        {**head, "run": "mean",
         **{k: float(np.mean(v)) if len(v) else math.nan for k, v in values.items()}},
        {**head, "run": "sd",
         **{k: float(np.std(v, ddof=1)) if len(v) > 1 else math.nan for k, v in values.items()}},
        {**head, "run": "range",
         **{k: (float(np.min(v)), float(np.max(v))) if len(v) else math.nan
            for k, v in values.items()}},
    ]


def run_folder(metrics_file: str | os.PathLike) -> Path | None:
    """The training workdir a metrics.json belongs to (the folder holding config.json, either
    the file's folder or the one above a `report/` folder), or None (an evaluate report)."""
    folder = Path(metrics_file).parent
    for candidate in ([folder.parent, folder] if folder.name == "report" else [folder]):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    return None


def read_config(folder: Path) -> dict[str, Any]:
    """A run's config.json as flat {dotted key: value}; ValueError names a corrupt file."""
    from haaqi_jax import config as cfglib

    file = folder / CONFIG_FILE
    config = read_json(file)
    if not isinstance(config, Mapping):
        raise ValueError(f"{file}: a {type(config).__name__}, not a run's config (an object "
                         f"of sections)")
    return cfglib.flatten(config)


def _whole(value: Any) -> Any:
    """`value` with whole floats as ints (1.0 -> 1), as a resume compares them: a loss keyword
    added by --set keeps its literal's type, so =1 and =1.0 are one setting."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    return value


def _path_spelling(key: str, value: Any, path_keys: Sequence[str]) -> Any:
    """`value` in its normal spelling (os.path.normpath) when `key` (dotted; also under
    distill.teacher.) is one of `path_keys` and `value` a non-empty string, else unchanged:
    "data/demo", "./data/demo" and "data/demo/" are one folder. Not made absolute nor
    symlinks resolved: runs started from other folders would be read from this one."""
    bare = key[len("distill.teacher."):] if key.startswith("distill.teacher.") else key
    if bare in path_keys and isinstance(value, str) and value:
        return os.path.normpath(value)
    return value


def group_settings(configs: Mapping[str, Mapping[str, Any] | None]
                   ) -> tuple[dict[str, list[str]], dict[str, str], str | None]:
    """Groups runs into settings: runs whose flat configs differ only in REPEAT_KEYS are
    repeats of one setting.

    Args:
      configs: {run name: `read_config` output, or None for a run without config.json}.
    Returns:
      (settings {label: [run names]}, legend {label: text}, note): labels are "A", "B", ... in
      order of first appearance, each described by the values of the keys that tell the
      settings apart, as its first run's config writes them (paths, `config.PATH_KEYS`, are
      compared in their normal spelling, `_path_spelling`); keys that only some settings have
      are summarised by section ("also distill.* (35 keys)"); a run given
      `distill.teacher_checkpoint` never read its `distill.teacher.*` keys, which therefore
      tell it apart from no other run. Runs without a config (evaluate reports) form one
      setting of their own. One setting "" (legend empty) when all runs share their settings
      or none has a config. `note` says which runs had no config when others had one, else
      None.
    """
    import fnmatch
    from haaqi_jax import config as cfglib

    names = list(configs)
    no_config = [name for name in names if configs[name] is None]
    with_config = [name for name in names if configs[name] is not None]
    if len(names) < 2 or not with_config:
        return {"": names}, {}, None
    note = (f"{', '.join(no_config)} {'has' if len(no_config) == 1 else 'have'} no "
            f"{CONFIG_FILE} (evaluate reports): summarised apart from the training runs"
            ) if no_config else None
    absent, unused = object(), object()
    keys = sorted({k for name in with_config for k in configs[name]
                   if not any(fnmatch.fnmatchcase(k, p) for p in REPEAT_KEYS)})

    def raw(name: str, key: str) -> Any:
        # A run given a teacher checkpoint never read its own teacher's settings.
        if key.startswith("distill.teacher.") and configs[name].get("distill.teacher_checkpoint"):
            return unused
        return configs[name].get(key, cfglib.IMPLICIT_VALUES.get(key, absent))

    def spelling(name: str, key: str) -> Any:
        """The key's value as JSON, as the run's config writes it (for the legend)."""
        found = raw(name, key)
        return found if found in (absent, unused) else json.dumps(_whole(found), sort_keys=True)

    def value(name: str, key: str) -> Any:
        """`spelling`, a path in its normal spelling: what tells settings apart."""
        found = raw(name, key)
        return found if found in (absent, unused) else json.dumps(
            _whole(_path_spelling(key, found, cfglib.PATH_KEYS)), sort_keys=True)

    def values(key: str) -> set:
        return {value(n, key) for n in with_config} - {unused}

    varying = [k for k in keys if len(values(k)) > 1]
    # Listed by value: keys every config has, and keys whose value differs where present;
    # keys some configs lack and that agree where present are counted by section.
    shared = [k for k in varying if absent not in values(k) or len(values(k) - {absent}) > 1]
    partial_sections = {k.split(".")[0] for k in varying if k not in shared}
    if not varying and not no_config:
        return {"": names}, {}, None
    groups: dict[Any, list[str]] = {}
    texts: dict[Any, str] = {}
    for name in names:
        if configs[name] is None:
            signature = ("no config",)
            text = f"no {CONFIG_FILE} (evaluate reports)"
        else:
            signature = tuple(value(name, k) for k in varying)
            parts = [f"{k}={'<absent>' if value(name, k) is absent else spelling(name, k)}"
                     for k in shared if value(name, k) is not unused]
            sections: dict[str, int] = {}
            for k in varying:
                if k not in shared and value(name, k) not in (absent, unused):
                    section = k.split(".")[0]
                    sections[section] = sections.get(section, 0) + 1
            parts += [f"also {sec}.* ({count} key{'s' if count > 1 else ''} the others lack)"
                      for sec, count in sorted(sections.items())]
            parts += [f"no {sec}.*" for sec in sorted(partial_sections - set(sections))]
            text = ", ".join(parts) or "the training runs (their settings agree)"
        groups.setdefault(signature, []).append(name)
        texts.setdefault(signature, text)
    labels = [_label(i) for i in range(len(groups))]
    legend = {label: texts[signature] for label, signature in zip(labels, groups)}
    return dict(zip(labels, groups.values())), legend, note


def _label(i: int) -> str:
    letters = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        letters = chr(ord("A") + r) + letters
    return letters


def read_distill_report(folder: Path) -> dict[str, Any] | None:
    """A distillation run's distill_report.json (student vs teacher), or None when it has
    none; ValueError names a corrupt file."""
    file = folder / DISTILL_REPORT_FILE
    if not file.is_file():
        return None
    report = read_json(file)
    if not isinstance(report, Mapping) or not isinstance(report.get("splits"), Mapping):
        raise ValueError(f"{file}: no 'splits' entry; is it a haaqi_jax distill_report.json?")
    return report


#: Columns of the distillation table.
DISTILL_COLUMNS = ("teacher_lcc", "student_lcc", "lcc_gap", "teacher_srcc", "student_srcc",
                   "time_ratio", "encoder_time_ratio", "encoder_reduction")


def distill_rows(reports: Mapping[str, Mapping[str, Any]],
                 splits: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Student vs teacher per split and run, from `read_distill_report` outputs.

    Returns:
      [{"split", "run", *DISTILL_COLUMNS}] (NaN where a report lacks a number), splits in
      `splits` order (default: sorted), runs in `reports` order.
    """
    present = sorted({s for r in reports.values() for s in r["splits"]})
    rows = []
    for split in (present if splits is None else [s for s in splits if s in present]):
        for name, report in reports.items():
            entry = report["splits"].get(split)
            if entry is None:
                continue
            teacher, student = entry.get("teacher") or {}, entry.get("student") or {}
            timing = report.get("seconds_per_clip") or {}
            rows.append({
                "split": split, "run": name,
                "teacher_lcc": _number(teacher.get("lcc")),
                "student_lcc": _number(student.get("lcc")),
                "lcc_gap": _number(entry.get("lcc_gap")),
                "teacher_srcc": _number(teacher.get("srcc")),
                "student_srcc": _number(student.get("srcc")),
                "time_ratio": _number(timing.get("ratio_model")),
                "encoder_time_ratio": _number(timing.get("ratio_encoder")),
                "encoder_reduction": _number((report.get("params") or {})
                                             .get("encoder_reduction"))})
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, tuple):
        return f"{value[0]:.4f} to {value[1]:.4f}"
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def markdown(rows: Sequence[Mapping[str, Any]], legend: Mapping[str, str] | None = None,
             distill: Sequence[Mapping[str, Any]] = (), metrics: Sequence[str] = ()) -> str:
    """The `compare` rows as a Markdown table (summary rows in bold), a column for each of
    `metrics` after MSE; with several settings a "setting" column and the `legend` above the
    table; the `distill_rows` as a second table."""
    grouped = bool(legend)
    lines = []
    if grouped:
        lines += ["Settings (runs that differ only in their seed are one setting):", ""]
        lines += [f"- **{label}**: {text}" for label, text in legend.items()] + [""]
    lines += ["| split | " + ("setting | " if grouped else "") + "run | n | LCC | SRCC | MSE |"
              + "".join(f" {k} |" for k in metrics),
              "|---|" + ("---|" if grouped else "") + "---|" * (5 + len(metrics))]
    for row in rows:
        summary = row["run"] in SUMMARIES
        run = f"**{row['run']}**" if summary else row["run"]
        n = (f"{row['n']} run{'s' if row['n'] != 1 else ''}" if summary
             else int(row["n"]))
        setting = f"{row.get('setting', '')} | " if grouped else ""
        lines.append(f"| {row['split']} | {setting}{run} | {n} | "
                     + " | ".join(_cell(row[k]) for k in SCORES + tuple(metrics)) + " |")
    if distill:
        lines += ["", "Distillation (distill_report.json): student vs teacher; time ratio = "
                  "student / teacher inference time per clip, whole model (encoder alone)", "",
                  "| split | run | teacher LCC | student LCC | LCC gap | teacher SRCC | "
                  "student SRCC | time ratio | encoder params |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in distill:
            reduction = ("n/a" if math.isnan(row["encoder_reduction"])
                         else f"{100 * row['encoder_reduction']:.2f} % fewer")
            lines.append(f"| {row['split']} | {row['run']} | "
                         + " | ".join(_cell(row[k]) for k in DISTILL_COLUMNS[:5])
                         + f" | {_cell(row['time_ratio'])} ({_cell(row['encoder_time_ratio'])})"
                         + f" | {reduction} |")
    return "\n".join(lines) + "\n"


#: The least y range of a comparison panel (LCC / SRCC): seed-to-seed spread is ~0.01-0.02.
MIN_PLOT_RANGE = 0.05


def comparison_plot(rows: Sequence[Mapping[str, Any]], path: Path, score: str = "lcc") -> Path:
    """One panel per split: each run's `score` (lcc, srcc, mse or a metric of the rows) as a
    dot, its setting's mean +- sd as a bar (settings side by side on the x axis; one column
    when the runs are one setting); runs without a value there are not drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(row["split"] for row in rows))
    settings = sorted({row.get("setting", "") for row in rows}, key=lambda s: (len(s), s))
    fig, axes = plt.subplots(1, len(splits), figsize=(1.2 + 1.1 * len(settings) * len(splits)
                                                      + 1.2 * len(splits), 3.4),
                             dpi=120, squeeze=False)
    for ax, split in zip(axes[0], splits):
        for x, setting in enumerate(settings):
            mine = [r for r in rows if r["split"] == split and r.get("setting", "") == setting]
            # A run whose report lacks a metric of your own has None there: not drawn.
            values = [r[score] for r in mine if r["run"] not in SUMMARIES
                      and _defined(r.get(score))]
            summary = {r["run"]: r.get(score) for r in mine if r["run"] in SUMMARIES}
            ax.scatter([x] * len(values), values, s=16, color="tab:blue", alpha=0.7, zorder=3)
            mean, sd = summary.get("mean"), summary.get("sd")
            if _defined(mean):
                ax.errorbar([x + 0.15], [mean], yerr=[[sd if _defined(sd) else 0.0]] * 2,
                            fmt="_", color="black", ms=14, capsize=3, zorder=4)
        ax.set_xticks(range(len(settings)), [s or "all runs" for s in settings])
        ax.set_xlim(-0.5, len(settings) - 0.5)
        # At least MIN_PLOT_RANGE tall and no offset: runs 3e-6 apart filled the axis and
        # looked as far apart as real differences.
        low, high = ax.get_ylim()
        middle, half = (low + high) / 2, max(high - low, MIN_PLOT_RANGE) / 2
        ax.set_ylim(middle - half, middle + half)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set(title=split, ylabel=score.upper() if ax is axes[0][0] else None)
        ax.grid(axis="y", color="0.92")
    fig.suptitle(f"{score.upper()} per run (dots) and per setting (mean +- sd)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _write_csv(rows: Sequence[Mapping[str, Any]], path: Path, metrics: Sequence[str] = ()
               ) -> None:
    """The `compare` rows as CSV; a metric not in a run's report is an empty cell (an
    undefined one "nan", as the scores)."""
    columns = SCORES + tuple(metrics)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "setting", "run", "n", *columns])
        for row in rows:
            writer.writerow([row["split"], row.get("setting", ""), row["run"], int(row["n"]),
                             *(("%s to %s" % row[k]) if isinstance(row[k], tuple) else row[k]
                               for k in columns)])


def _write_distill_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "run", *DISTILL_COLUMNS])
        for row in rows:
            writer.writerow([row["split"], row["run"], *(row[k] for k in DISTILL_COLUMNS)])


#: Suffixes of an --out that names the Markdown table itself (replaced for the other files).
TABLE_SUFFIXES = (".md", ".markdown", ".txt")


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    """The files `compare --out OUT` writes: {"table", "csv", "distill_csv", "plot"}.

    "X.md" gives X.csv, X.distill.csv and X.png; an OUT without a table suffix keeps its whole
    name ("lr_0.001" gives lr_0.001.csv, not lr_0.csv). ValueError for an OUT ending in .csv or
    .png, whose table would be overwritten by the numbers or the plot.
    """
    out = Path(out).expanduser()
    suffix = out.suffix.lower()
    if suffix in (".csv", ".png"):
        stem = out.with_suffix("")
        raise ValueError(f"--out {out} names the Markdown table; the {suffix} file is written "
                         f"beside it: give e.g. --out "
                         f"{stem if stem.suffix.lower() in TABLE_SUFFIXES else out.with_suffix('.md')}")
    base = out.with_suffix("") if suffix in TABLE_SUFFIXES else out
    sibling = lambda ext: base.with_name(base.name + ext)
    return {"table": out, "csv": sibling(".csv"), "distill_csv": sibling(".distill.csv"),
            "plot": sibling(".png")}


def _run_names(paths: Sequence[Path]) -> list[str]:
    """Short unique names: the folder names, or the path where folder names repeat."""
    def folder(p: Path) -> Path:
        p = p.parent if p.suffix == ".json" else p
        return p.parent if p.name == "report" else p
    names = [folder(p).name or str(p) for p in paths]
    # A run folder named like a summary row ("mean") would read as that setting's mean.
    return [str(p) if names.count(n) > 1 or n in SUMMARIES else n for p, n in zip(paths, names)]


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                        help="training workdirs, evaluate report folders or metrics.json files")
    parser.add_argument("--splits", nargs="+", default=None,
                        help="splits to show (default: all of them, 'all' first)")
    parser.add_argument("--metric", dest="metrics", action="append", default=[],
                        metavar="NAME", help="also a metric of your own from the reports (one "
                        "that evaluate --metric or report.metrics put in them), after MSE "
                        "(repeatable)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the tables to this Markdown file (X.md), the numbers to "
                             "X.csv (and X.distill.csv) and a plot to X.png beside it")
    parser.add_argument("--plot", default="lcc", metavar="NAME",
                        help="what X.png shows per run and setting: lcc (default), srcc, mse "
                             "or one of the --metric names")


def run(args: argparse.Namespace) -> int:
    """Prints the comparison; returns 1 when a run could not be read (named on stderr and left
    out; the others are compared), else 0. A split no run has raises (`haaqi-jax`: exit 2)."""
    import sys
    from haaqi_jax.cli import writable_file

    metrics = check_metric_names(args.metrics, "--metric")
    if args.plot not in SCORES + metrics:
        raise ValueError(f"--plot {args.plot!r}: not {', '.join(SCORES[:-1])}, {SCORES[-1]} "
                         f"nor a --metric of this comparison ({list(metrics)})")
    outputs = {}
    if args.out is not None:
        outputs = {kind: writable_file(path, "--out" if kind == "table" else f"--out's {kind}")
                   for kind, path in output_paths(args.out).items()}
    readable: dict[Path, tuple[Path, dict]] = {}           # metrics file -> (argument, scores)
    unreadable = 0
    for path in args.runs:
        try:
            file = metrics_path(path).resolve()
            if file in readable:                  # one report named twice is one run
                print(f"skipped: {path} is the same report as {readable[file][0]}",
                      file=sys.stderr)
                continue
            readable[file] = (path, read_scores(path, metrics))
        except (OSError, ValueError) as err:
            print(f"skipped: {err}", file=sys.stderr)
            unreadable += 1
    kept = list(readable.values())
    names = _run_names([path for path, _ in kept])
    runs = dict(zip(names, (scores for _, scores in kept)))
    if not runs:
        print("no readable report among the runs given", file=sys.stderr)
        return 1
    folders = dict(zip(names, (run_folder(file) for file in readable)))
    configs, distill = {}, {}
    for name, folder in folders.items():
        configs[name] = None
        if folder is None:
            continue
        try:
            configs[name] = read_config(folder)
        except (OSError, ValueError) as err:   # its setting is unknown: left out, exit 1
            print(f"skipped: {err}", file=sys.stderr)
            unreadable += 1
            del runs[name], configs[name]
            continue
        try:
            report = read_distill_report(folder)
        except (OSError, ValueError) as err:   # the scores still count; the table goes
            print(f"{name}: {err}", file=sys.stderr)
            unreadable += 1
            continue
        if report is not None:
            distill[name] = report
    if not runs:
        print("no readable run among the runs given", file=sys.stderr)
        return 1
    inputs = {file.resolve() for file in readable} | {
        (folder / extra).resolve() for folder in folders.values() if folder is not None
        for extra in (CONFIG_FILE, DISTILL_REPORT_FILE)}
    clash = [path for path in outputs.values() if path.resolve() in inputs]
    if clash:
        raise ValueError(f"--out would overwrite {clash[0]}, a file of a run being compared")
    settings, legend, note = group_settings(configs)
    if note:
        print(f"note: {note}", file=sys.stderr)
    # A split or metric no run has: one line, exit 2 (cli).
    rows = compare(runs, args.splits, settings, metrics)
    for text in (missing_metrics(rows, metrics) + unsummarised(runs, rows)
                 + left_out(rows, metrics)):
        print(f"note: {text}", file=sys.stderr)
    distilled = distill_rows(distill, args.splits)
    text = markdown(rows, legend, distilled, metrics)
    print(text, end="")
    if outputs:
        outputs["table"].parent.mkdir(parents=True, exist_ok=True)
        outputs["table"].write_text(text)
        _write_csv(rows, outputs["csv"], metrics)
        if distilled:
            _write_distill_csv(distilled, outputs["distill_csv"])
        comparison_plot(rows, outputs["plot"], args.plot)
    return 1 if unreadable else 0
