"""`haaqi-jax compare`: one table of several runs' scores, with their mean and spread.

    haaqi-jax compare runs/seed0 runs/seed1 runs/seed2 [--splits test_unseen valid]
        [--out comparison.md]

On the demo set one training run moves by up to 0.03 LCC when its labels move by 1e-4 (see the
README), so a setting is judged on several seeds. Each argument is a training workdir (its
`report/metrics.json`), a report folder of `haaqi-jax evaluate` (its `metrics.json`) or a
metrics.json itself. For every split (and "all"), the table lists each run's LCC, SRCC and MSE,
then their mean, sample standard deviation and range over the runs. A path without a readable
report is named and skipped; the others are still compared. `--out` also writes the table
(Markdown, and the same numbers as `<out>.csv`).
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

#: Scores tabulated per run and split, in table order.
SCORES = ("lcc", "srcc", "mse")
#: Name of the whole-report entry ("overall" in metrics.json).
ALL = "all"


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


def read_scores(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """{split or "all": {"lcc", "srcc", "mse", "n"}} of one report.

    Raises:
      FileNotFoundError / ValueError naming the file when it is missing, not JSON, or lacks
      the "overall" entry or a score.
    """
    file = metrics_path(path)
    try:
        report = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not JSON ({err.msg})") from None
    if not isinstance(report, Mapping) or "overall" not in report:
        raise ValueError(f"{file}: no 'overall' entry; is it a haaqi_jax metrics.json?")
    entries = {ALL: report["overall"], **dict(report.get("by_split") or {})}
    scores = {}
    for name, entry in entries.items():
        missing = [k for k in SCORES + ("n",) if k not in entry]
        if missing:
            raise ValueError(f"{file}: entry {name!r} has no {missing[0]!r}")
        scores[name] = {k: _number(entry[k]) for k in SCORES + ("n",)}
    return scores


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)   # json_safe writes NaN as null


def compare(runs: Mapping[str, Mapping[str, Mapping[str, float]]],
            splits: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Table rows: per split, one row per run, then "mean", "sd" and "range" over the runs.

    Args:
      runs: {run name: `read_scores` output}, in table order.
      splits: splits to keep (default: every split any run has, "all" first, then sorted).
    Returns:
      [{"split", "run", "n", "lcc", "srcc", "mse"}]; the summary rows have n = number of runs
      that have the split, "sd" is the sample standard deviation (NaN for a single run) and
      "range" holds (min, max) pairs. Splits missing from a run are left out of its rows.
    Raises:
      ValueError naming a requested split that no run has.
    """
    present = sorted({s for scores in runs.values() for s in scores} - {ALL})
    present = ([ALL] if any(ALL in s for s in runs.values()) else []) + present
    if splits is None:
        splits = present
    unknown = [s for s in splits if s not in present]
    if unknown:
        raise ValueError(f"no run has split {unknown[0]!r} (splits: {present})")
    rows: list[dict[str, Any]] = []
    for split in splits:
        have = {name: scores[split] for name, scores in runs.items() if split in scores}
        rows += [{"split": split, "run": name, **entry} for name, entry in have.items()]
        # A run whose score is undefined (e.g. a correlation over one clip) is left out of
        # that score's summary instead of turning it into NaN.
        values = {k: np.asarray([v for v in (entry[k] for entry in have.values())
                                 if math.isfinite(v)]) for k in SCORES}
        rows.append({"split": split, "run": "mean", "n": len(have),
                     **{k: float(np.mean(v)) if len(v) else math.nan
                        for k, v in values.items()}})
        rows.append({"split": split, "run": "sd", "n": len(have),
                     **{k: float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
                        for k, v in values.items()}})
        rows.append({"split": split, "run": "range", "n": len(have),
                     **{k: (float(np.min(v)), float(np.max(v))) if len(v) else math.nan
                        for k, v in values.items()}})
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, tuple):
        return f"{value[0]:.4f} to {value[1]:.4f}"
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The `compare` rows as a Markdown table (summary rows in bold)."""
    lines = ["| split | run | n | LCC | SRCC | MSE |", "|---|---|---|---|---|---|"]
    for row in rows:
        summary = row["run"] in ("mean", "sd", "range")
        run = f"**{row['run']}**" if summary else row["run"]
        n = (f"{row['n']} run{'s' if row['n'] != 1 else ''}" if summary
             else int(row["n"]))
        lines.append(f"| {row['split']} | {run} | {n} | "
                     + " | ".join(_cell(row[k]) for k in SCORES) + " |")
    return "\n".join(lines) + "\n"


def _write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "run", "n", *SCORES])
        for row in rows:
            writer.writerow([row["split"], row["run"], int(row["n"]),
                             *(("%s-%s" % row[k]) if isinstance(row[k], tuple) else row[k]
                               for k in SCORES)])


def _run_names(paths: Sequence[Path]) -> list[str]:
    """Short unique names: the folder names, or the path where folder names repeat."""
    def folder(p: Path) -> Path:
        p = p.parent if p.suffix == ".json" else p
        return p.parent if p.name == "report" else p
    names = [folder(p).name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                        help="training workdirs, evaluate report folders or metrics.json files")
    parser.add_argument("--splits", nargs="+", default=None,
                        help="splits to show (default: all of them, 'all' first)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the table to this Markdown file (and a .csv beside it)")


def run(args: argparse.Namespace) -> int:
    """Prints the comparison; returns 1 when no run could be read, else 0 (unreadable runs are
    reported on stderr and left out). A split no run has raises (`haaqi-jax`: exit 2)."""
    import sys
    from haaqi_jax.cli import writable_file

    if args.out is not None:
        writable_file(args.out, "--out")
    readable: dict[Path, tuple[Path, dict]] = {}           # metrics file -> (argument, scores)
    for path in args.runs:
        try:
            file = metrics_path(path).resolve()
            if file in readable:                  # one report named twice is one run
                print(f"skipped: {path} is the same report as {readable[file][0]}",
                      file=sys.stderr)
                continue
            readable[file] = (path, read_scores(path))
        except (OSError, ValueError) as err:
            print(f"skipped: {err}", file=sys.stderr)
    kept = list(readable.values())
    runs = dict(zip(_run_names([path for path, _ in kept]), (scores for _, scores in kept)))
    if not runs:
        print("no readable report among the runs given", file=sys.stderr)
        return 1
    rows = compare(runs, args.splits)        # a split no run has: one line, exit 2 (cli)
    text = markdown(rows)
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        _write_csv(rows, args.out.with_suffix(".csv"))
    return 0
