"""`haaqi-jax predict`: HAAQI of audio files with a HAAQI-Net checkpoint, written to a CSV.

    haaqi-jax predict --checkpoint ckpt/haaqinet --audiogram 10,15,20,30,40,45,50,55 \\
        music/ one.flac --out results.csv
    haaqi-jax predict --checkpoint ckpt/haaqinet --audiograms listeners.csv music/ --out r.csv
    haaqi-jax predict --checkpoint ckpt/haaqinet test.jsonl --out r.csv

INPUTS are audio files, folders (searched recursively for every extension soundfile reads) or
manifests (`.jsonl`, or the authors' `{"data": [...]}` `.json`; rows with `file_path` and
`audiogram`, as `haaqi_jax.data.manifest` reads them). Audio of any sample rate and channel
count is mixed to mono and resampled to 16 kHz; samples are expected in [-1, 1] (a clip peaking
above 2 is scored with a warning; above 64, e.g. a float file of unscaled 16-bit values, it is
refused).

Which audiogram a file gets: a manifest row always has its own `audiogram`; any other file gets
its entry in --audiograms FILE, else the --audiogram default. --audiograms FILE maps files to
8 levels in dB HL at 250, 500, 1000, 2000, 3000, 4000, 6000, 8000 Hz, as either
  - CSV with a header row: `file` and then the 8 frequencies in that order (`250`, `500`, ... or
    `250Hz`, ...), one file per row; or
  - JSON: an object {"<file>": [8 levels], ...}.
A key matches a file when it names the same file: as a path relative to the current folder, to
the table's own folder or to the folder argument the file was found in, or as an absolute path;
failing that, a key that is a bare file name applies to every file of that name. Entries that
match no input are listed in a warning, a key listed twice fails the files it matches, and the
CSV's `audiogram` column says where each file's audiogram came from.

The CSV has columns file, id (a manifest row's id, else empty), haaqi (empty on error),
duration_s, error (empty when scored), audiogram (manifest | --audiograms KEY | --audiogram).
A bad file (unreadable, NaN, silent, too short, no or bad audiogram, including a bad
--audiograms entry) or a manifest that cannot be read is reported on stderr and in `error`; the
others are still scored. Interrupted (Ctrl-C), it writes what it scored so far, the rest marked
"not scored: interrupted". While it runs, OUT.partial.jsonl records each scored file, so that a
rerun of the same command after an interruption or a kill scores only the files not scored yet
(by the same model, with the same audiogram, and unchanged since); it is deleted once the CSV
is written whole. Exit status: 0 when every file was scored, 1 when some failed, 2 on a
usage error (bad checkpoint, bad --audiogram, an --audiograms file that cannot be read, no
inputs, an unwritable --out), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from haaqi_jax.audiogram import STANDARD_FREQUENCIES, parse_numbers, validate_levels

#: Inputs read as manifests (a .csv is named as not one, instead of read as audio).
MANIFEST_SUFFIXES = (".jsonl", ".json", ".csv")
#: Beside --out while `predict` runs: the scores so far, one line per file, so that a killed or
#: interrupted run resumes where it stopped (rerun the same command); deleted once the CSV is
#: written whole.
JOURNAL_SUFFIX = ".partial.jsonl"


@dataclasses.dataclass
class Job:
    """One file to score; `error` set means it is reported, not scored."""

    file: Path
    name: str                       # as written to the CSV
    audiogram: np.ndarray | None = None
    channel: str | None = None      # "left" / "right": one channel of a stereo file
    error: str | None = None
    score: float | None = None
    duration_s: float | None = None
    row_id: str | None = None       # the manifest row's id, to join results back to it
    row_at: str | None = None       # "manifest:line" of a manifest row, for its error messages
    found_in: Path | None = None    # the folder argument it was found under
    audiogram_from: str = ""        # "manifest", "--audiograms KEY" or "--audiogram"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from haaqi_jax.cli import add_dtype_argument, positive_int
    parser.add_argument("inputs", nargs="+", metavar="INPUTS",
                        help="audio files, folders (recursive) or .jsonl manifests")
    parser.add_argument("--checkpoint", required=True,
                        help="HAAQI-Net directory (convert_weights.py --haaqinet output, or a "
                             "run's report/best_model)")
    parser.add_argument("--audiogram", default=None,
                        help="default audiogram: 8 comma-separated dB HL levels at "
                             "250,500,1000,2000,3000,4000,6000,8000 Hz")
    parser.add_argument("--audiograms", default=None, metavar="FILE",
                        help="CSV (header: file,250,500,...,8000) or JSON ({file: [8 levels]}) "
                             "mapping file names to audiograms")
    parser.add_argument("--out", required=True, help="CSV to write")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="clips per forward pass (default 8)")
    add_dtype_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def audio_extensions() -> set[str]:
    import soundfile
    exts = {f".{f.lower()}" for f in soundfile.available_formats()}
    return exts | {".wav", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".mp3", ".au", ".caf"}


def parse_audiogram(text: str, *, where: str = "--audiogram") -> np.ndarray:
    """'v1,...,v8' -> (8,) float32, ValueError naming `where` on a bad value or count."""
    return validate_levels(parse_numbers(text, where=where), where=where)


def _frequency_of(column: str) -> float | None:
    text = column.strip().lower().removesuffix("hz").strip()
    try:
        return float(text)
    except ValueError:
        return None


def read_audiogram_table(path: str | Path) -> dict[str, np.ndarray | str]:
    """Reads --audiograms FILE (CSV or JSON, see the module docstring).

    Returns:
      {file name: (8,) levels, or the reason its entry is unusable}: a bad entry fails only
      the files that use it (`assign_audiograms`), not the whole run.
    Raises:
      FileNotFoundError, or ValueError naming the file for a table that cannot be read at all
      (not JSON, not a mapping, a wrong CSV header).
    """
    from haaqi_jax.config import is_number
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--audiograms: {path} is a folder; give a CSV or JSON file")
    if not path.is_file():
        raise FileNotFoundError(f"--audiograms: {path} does not exist")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:   # a BOM (Excel's CSV UTF-8)
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8"
                         ) from None
    table: dict[str, np.ndarray] = {}
    if path.suffix.lower() == ".json":
        twice: set[str] = set()

        def pairs(items):   # json.loads keeps the last of a repeated key without a word
            seen = set()
            for key, _ in items:
                (twice if key in seen else seen).add(key)
            return dict(items)

        try:
            data = json.loads(text, object_pairs_hook=pairs)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object mapping file names to 8 levels")
        for key, levels in data.items():
            where = f"{path}: key {key!r}"
            if key in twice:
                table[str(key)] = f"{where}: listed twice"
                continue
            try:
                if not isinstance(levels, list) or not all(map(is_number, levels)):
                    raise ValueError(f"{where}: expected a list of 8 numbers")
                table[str(key)] = validate_levels(levels, where=where)
            except ValueError as err:
                table[str(key)] = str(err)
        return table
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty CSV")
        freqs = [_frequency_of(c) for c in header[1:]]
        if (header[0].strip().lower() != "file"
                or tuple(freqs) != tuple(STANDARD_FREQUENCIES)):
            raise ValueError(f"{path}: header must be 'file' then the 8 frequencies "
                             f"{[int(f) for f in STANDARD_FREQUENCIES]}, got {header}")
        first_row: dict[str, int] = {}
        for row_number, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            key = row[0].strip()
            where = f"{path}: row {row_number} ({key})"
            if key in first_row:   # which of the two was meant is unknown
                table[key] = (f"{where}: {key!r} is listed twice (rows {first_row[key]} and "
                              f"{row_number})")
                continue
            first_row[key] = row_number
            try:
                if len(row) != 1 + len(STANDARD_FREQUENCIES):
                    raise ValueError(f"{where}: expected {1 + len(STANDARD_FREQUENCIES)} "
                                     f"columns, got {len(row)}")
                try:
                    levels = [float(v) for v in row[1:]]
                except ValueError:
                    raise ValueError(f"{where}: levels {row[1:]} are not all numbers") from None
                table[key] = validate_levels(levels, where=where)
            except ValueError as err:
                table[key] = str(err)
    return table


def collect_jobs(inputs: Iterable[str]) -> list[Job]:
    """Expands INPUTS into one Job per audio file (manifest rows carry their audiogram)."""
    jobs: list[Job] = []
    extensions = None
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            extensions = extensions or audio_extensions()
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in extensions)
            if not found:
                print(f"warning: no audio files under {path}", file=sys.stderr)
            jobs.extend(Job(p, str(p), found_in=path) for p in found)
        elif path.suffix.lower() in MANIFEST_SUFFIXES:
            jobs.extend(_manifest_jobs(path))
        else:
            job = Job(path, text)
            if not path.is_file():
                job.error = f"{path}: no such file"
            jobs.append(job)
    return jobs


def _manifest_jobs(path: Path) -> list[Job]:
    from haaqi_jax.data.manifest import read_manifest
    if not path.is_file():
        return [Job(path, str(path), error=f"{path}: no such manifest")]
    try:
        rows = read_manifest(path, on_error="skip", read_labels=False)   # labels unused
    except ValueError as err:   # unreadable, or no usable row: the other inputs still run
        return [Job(path, str(path), error=str(err))]
    jobs = [Job(Path(row.file_path), str(row.file_path) + (
                    f" ({row.channel} channel)" if row.channel else ""),
                audiogram=np.asarray(row.audiogram), audiogram_from="manifest",
                channel=row.channel, row_id=row.id, row_at=f"{path}:{row.line}")
            for row in rows]
    # A bad row is reported like a bad file; the other rows are still scored.
    jobs += [Job(path, f"{path}:{line}", error=reason, row_id=row_id)
             for (line, reason), row_id in zip(rows.skipped, rows.skipped_ids)]
    return jobs


def assign_audiograms(jobs: list[Job], default: np.ndarray | None,
                      table: dict[str, np.ndarray | str],
                      table_dir: Path | None = None) -> list[str]:
    """Gives each job its audiogram: its manifest row's, else its --audiograms entry (a bad
    entry fails that job with the entry's reason), else --audiogram.

    Args:
      table: `read_audiogram_table`'s {key: levels or reason}.
      table_dir: the table's folder, against which relative keys resolve too.
    Returns:
      The table's keys that matched no job (typically paths written relative to another
      folder), for the caller to report.
    """
    # Every file a key can name (a key names one file per base folder), as an absolute path.
    bases = [Path.cwd()] + [table_dir] * (table_dir is not None) + list(
        dict.fromkeys(job.found_in for job in jobs if job.found_in is not None))
    by_path: dict[str, str] = {}
    for key in table:
        for base in bases:
            by_path.setdefault(str((base / Path(key).expanduser()).resolve()), key)
    used: set[str] = set()
    for job in jobs:
        if job.audiogram is not None or job.error:
            continue
        key = by_path.get(str(job.file.resolve()))
        if key is None and job.file.name in table:
            key = job.file.name
        if key is not None:
            used.add(key)
            if isinstance(table[key], str):
                job.error = f"{job.name}: bad --audiograms entry: {table[key]}"
            else:
                job.audiogram, job.audiogram_from = table[key], f"--audiograms {key}"
        elif default is not None:
            job.audiogram, job.audiogram_from = default, "--audiogram"
        else:
            job.error = (f"{job.name}: no audiogram (give --audiogram, an --audiograms "
                         "entry or a manifest row)")
    return [key for key in table if key not in used]


def load_job(job: Job) -> np.ndarray | None:
    """16 kHz mono clip, or None with job.error set."""
    from haaqi_jax.data.audio import load_audio
    from haaqi_jax.fbank import WARN_PEAK
    from haaqi_jax.model import SAMPLE_RATE, prepare_waveform
    try:
        clip = prepare_waveform(load_audio(job.file, SAMPLE_RATE, job.channel), SAMPLE_RATE,
                                where=job.name)
    except (ValueError, OSError, RuntimeError) as e:  # soundfile raises RuntimeError subclasses
        job.error = str(e) if job.name in str(e) or str(job.file) in str(e) \
            else f"{job.name}: {e}"
        if job.row_at is not None:
            job.error = f"{job.row_at} (id {job.row_id!r}): {job.error}"
        return None
    job.duration_s = len(clip) / SAMPLE_RATE
    peak = float(np.max(np.abs(clip)))
    if peak > WARN_PEAK:   # scored, but BEATs' fbank reads it 20 log10(peak) dB too loud
        print(f"warning: {job.name}: peak {peak:.4g}; audio is expected in [-1, 1]",
              file=sys.stderr)
    return clip


def _by_length(jobs: list[Job]) -> list[Job]:
    """The jobs shortest file first, by their headers (a stable sort; unreadable files first,
    to be reported): chunks of similar lengths pad little, so they can be small."""
    from haaqi_jax.data.audio import audio_num_samples

    def length(job: Job) -> int:
        try:
            return audio_num_samples(job.file)
        except (ValueError, OSError, RuntimeError):
            return -1
    return sorted(jobs, key=length)


def _predict_within_memory(net, jobs: list[Job], clips: list[np.ndarray], batch_size: int,
                           bar, say) -> np.ndarray:
    """net.predict of these clips (16 kHz); when that runs out of memory, each clip alone, so
    that the clips that fit keep their scores and each one that does not fit fails by name
    (job.error; its score NaN). A whole song can need more memory than the host has (a
    released-size HAAQI-Net: ~2.4 GB for 4 minutes on a CPU, benchmarks/README.md)."""
    from haaqi_jax import host_memory
    audiograms = np.stack([job.audiogram for job in jobs])
    start = bar.n
    try:
        return net.predict(clips, 16000, audiograms, batch_size=batch_size, progress=bar)
    except (MemoryError, RuntimeError) as err:
        if not host_memory.is_out_of_memory(err):
            raise
        failure = err
    bar.n = start                     # the batches scored before the failure are scored again
    bar.refresh()
    scores = np.full(len(clips), np.nan, np.float32)
    for i, (job, clip) in enumerate(zip(jobs, clips)):
        try:
            if len(clips) == 1:
                raise failure
            scores[i] = net.predict([clip], 16000, audiograms[i:i + 1], batch_size=1,
                                    progress=bar)[0]
        except (MemoryError, RuntimeError) as err:
            if not host_memory.is_out_of_memory(err):
                raise
            job.error = (f"out of memory scoring {len(clip) / 16000:.1f} s of audio "
                         f"({host_memory.out_of_memory_summary(err)}); score it in shorter "
                         f"parts")
            say(f"error: {job.name}: {job.error}")
            bar.update(1)
    return scores


def journal_path(out: str | Path) -> Path:
    """The journal of a `predict` run writing the CSV `out`."""
    out = Path(out)
    return out.with_name(out.name + JOURNAL_SUFFIX)


def model_id(net, dtype: str) -> str:
    """What a journal's scores depend on besides the files: the weights, config and dtype."""
    from haaqi_jax.data.cache import params_fingerprint
    return f"{params_fingerprint(net.params, net.config.to_dict())}|{dtype}"


def _source_key(job: Job) -> str | None:
    """What job's score was computed from: the file as it is now (path, size, modification
    time), the channel read and the audiogram; None when the file cannot be stat'ed or the
    job has no audiogram (it fails without a score)."""
    from haaqi_jax.data.cache import source_id
    if job.audiogram is None:
        return None
    try:
        source = source_id(job.file.resolve(), job.channel)
    except OSError:
        return None
    levels = ",".join(repr(float(v)) for v in np.asarray(job.audiogram).ravel())
    return f"{source}|{levels}"


class ScoreJournal:
    """An append-only JSONL record of scored files (`JOURNAL_SUFFIX`, beside --out).

    Line 1 names the model (`model_id`); each further line is {"key", "score", "duration_s"}
    of one scored file (`_source_key`). A journal of another model is started afresh; a line
    cut short by a kill is dropped; a file changed since (size or modification time), read
    with another audiogram or channel, has another key and is scored again.
    """

    def __init__(self, path: str | Path, model: str):
        self.path, self.model = Path(path), model

    def restore(self, jobs: Iterable[Job]) -> int:
        """Fills score and duration_s of the jobs the journal holds; returns how many. Starts
        the journal (its model line) when there is none, or it is another model's."""
        from haaqi_jax.files import complete_lines
        entries: dict[str, tuple[float, float]] = {}
        header = None
        try:
            lines = complete_lines(self.path)
            header = json.loads(lines[0]) if lines else None
            entries = {e["key"]: (float(e["score"]), float(e["duration_s"]))
                       for e in map(json.loads, lines[1:])}
        except (ValueError, KeyError, TypeError, IndexError):   # not UTF-8 / JSON / entries
            header = None
        if not isinstance(header, dict) or header.get("model") != self.model:
            if self.path.is_file() and self.path.stat().st_size:
                print(f"note: {self.path} holds another model's scores (or is damaged); "
                      f"scoring every file afresh", file=sys.stderr)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"model": self.model}) + "\n")
            return 0
        restored = 0
        for job in jobs:
            entry = None if job.error else entries.get(_source_key(job))
            if entry is not None:
                job.score, job.duration_s = entry
                restored += 1
        return restored

    def record(self, jobs: Iterable[Job]) -> None:
        """Appends the scored jobs (flushed to disk: a kill loses no recorded line)."""
        lines = [json.dumps({"key": key, "score": job.score, "duration_s": job.duration_s})
                 for job in jobs if job.score is not None
                 and (key := _source_key(job)) is not None]
        if lines:
            with open(self.path, "a") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())


def score_jobs(net, jobs: list[Job], *, batch_size: int = 8, progress: bool = True,
               chunk_size: int | None = None, desc: str = "HAAQI-Net",
               print_errors: bool = True, journal: ScoreJournal | None = None) -> None:
    """Loads and scores the jobs, filling job.score / job.error.

    Files are read shortest first, `chunk_size` at a time (default two batches): memory stays
    bounded, chunks of like lengths fill whole batches, and Ctrl-C loses at most the chunk in
    flight. `desc` names the progress bar; `print_errors=False` leaves the errors to the
    caller (they are in job.error either way). With a `journal`, the jobs it holds are not
    scored again, and each chunk's scores are recorded in it once scored.
    """
    from tqdm.auto import tqdm
    chunk_size = chunk_size or 2 * batch_size
    restored = 0 if journal is None else journal.restore(jobs)
    if restored:
        print(f"{desc}: {restored} of {len(jobs)} files scored by an earlier run "
              f"({journal.path}); scoring the rest", file=sys.stderr)
    ordered = _by_length([job for job in jobs if job.score is None])
    say = (lambda text: print(text, file=sys.stderr)) if print_errors else (lambda text: None)
    with tqdm(total=len(jobs), initial=restored, desc=desc, unit="file",
              disable=not progress) as bar:
        for start in range(0, len(ordered), chunk_size):
            chunk = ordered[start:start + chunk_size]
            ready, clips = [], []
            for job in chunk:
                clip = None if job.error else load_job(job)
                if clip is None:
                    say(f"error: {job.error}")
                    bar.update(1)
                    continue
                ready.append(job)
                clips.append(clip)
            if not ready:
                continue
            with warnings.catch_warnings():   # load_job has named each loud file already
                warnings.filterwarnings("ignore", message=r"predict: items .* peak above")
                scores = _predict_within_memory(net, ready, clips, batch_size, bar, say)
            for job, score in zip(ready, scores):
                if job.error:                      # out of memory alone: named already
                    continue
                if np.isfinite(score):
                    job.score = float(score)
                else:   # never a silent NaN in the results: the model's weights are suspect
                    job.error = "the model gave a non-finite score (NaN weights?)"
                    say(f"error: {job.name}: {job.error}")
            if journal is not None:
                journal.record(ready)


def write_results(path: str | Path, jobs: list[Job]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "id", "haaqi", "duration_s", "error", "audiogram"])
        for job in jobs:
            writer.writerow([job.name, job.row_id or "",
                             "" if job.score is None else f"{job.score:.6f}",
                             "" if job.duration_s is None else f"{job.duration_s:.3f}",
                             job.error or "", job.audiogram_from])
    return path


def run(args: argparse.Namespace) -> int:
    from haaqi_jax.cli import writable_file
    from haaqi_jax.model import HAAQINet, compute_dtype
    # Usage errors raise: `haaqi-jax` reports them in one line with exit 2.
    compute_dtype(args.dtype, "--dtype")
    default = None if args.audiogram is None else parse_audiogram(args.audiogram)
    table = {} if args.audiograms is None else read_audiogram_table(args.audiograms)
    writable_file(args.out, "--out")                        # before the scoring, not after
    jobs = collect_jobs(args.inputs)
    if not jobs:
        raise ValueError("no audio files found in INPUTS")
    net = HAAQINet.load(args.checkpoint, dtype=args.dtype)
    manifests = any(Path(i).suffix.lower() in MANIFEST_SUFFIXES for i in args.inputs)
    if default is None and args.audiograms is None and not manifests:
        raise ValueError("no audiogram for any file: pass --audiogram L250,...,L8000 (one "
                         "listener for all), --audiograms TABLE (one per file), or a manifest "
                         "whose rows carry theirs")
    unused = assign_audiograms(jobs, default, table,
                               None if args.audiograms is None else Path(args.audiograms).parent)
    if unused:
        print(f"warning: {len(unused)} --audiograms entr{'y' if len(unused) == 1 else 'ies'} "
              f"matched no input file: {', '.join(repr(k) for k in unused[:5])}"
              f"{', ...' if len(unused) > 5 else ''} (a key is a path relative to this folder, "
              f"to the table's folder or to a folder argument, or a bare file name)",
              file=sys.stderr)
    journal = ScoreJournal(journal_path(args.out), model_id(net, args.dtype))
    try:
        score_jobs(net, jobs, batch_size=args.batch_size, progress=not args.no_progress,
                   journal=journal)
    except KeyboardInterrupt:   # keep what was scored
        for job in jobs:
            if job.score is None and not job.error:
                job.error = "not scored: interrupted"
        write_results(args.out, jobs)
        print(f"the files scored so far are in {args.out} and {journal.path}, which a rerun "
              f"of the same command reads", file=sys.stderr)
        raise
    out = write_results(args.out, jobs)
    journal.path.unlink(missing_ok=True)        # the CSV holds every score now
    failed = sum(job.score is None for job in jobs)
    print(f"scored {len(jobs) - failed} of {len(jobs)} files -> {out}", file=sys.stderr)
    return 1 if failed else 0
