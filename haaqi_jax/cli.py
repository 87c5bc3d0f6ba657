"""`haaqi-jax` command line: one subcommand per job, each implemented next to its concept.

Each subcommand's module provides `add_arguments(parser)` and `run(args) -> int`; they are
imported only when their subcommand runs, so `haaqi-jax --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, NoReturn

from haaqi_jax import host_memory

# name -> (module, one-line help)
SUBCOMMANDS = {
    "score": ("haaqi_jax.haaqi.score_cli", "HAAQI of one processed/reference pair"),
    "label": ("haaqi_jax.haaqi.label", "HAAQI labels for every row of a manifest (resumable)"),
    "demo-data": ("haaqi_jax.data.demo", "write the self-made demo music-quality dataset"),
    "predict": ("haaqi_jax.predict", "predict HAAQI of audio files with a HAAQI-Net checkpoint"),
    "evaluate": ("haaqi_jax.evaluate", "LCC/SRCC/MSE and a scatter plot on a labelled manifest"),
    "compare": ("haaqi_jax.compare", "several runs' LCC/SRCC/MSE side by side, mean and spread"),
}

#: Commands that an interrupted run resumes when the same command runs again.
RESUMABLE = ("label", "demo-data", "predict", "evaluate")


EPILOG = ("exit codes: 0 done; 1 done, but some items failed (each named on stderr, or in the "
          "errors file of label); 2 a usage "
          "or input error (one line on stderr; HAAQI_JAX_TRACEBACK=1 adds the traceback); 130 "
          "interrupted (finished work is kept)")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haaqi-jax", description=__doc__.splitlines()[0],
                                     epilog=EPILOG)
    from haaqi_jax import __version__
    parser.add_argument("--version", action="version", version=f"haaqi-jax {__version__}")
    add_import_argument(parser, "before the command runs, for a model that uses it "
                                "(repeatable; before COMMAND)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen subcommand's module is imported.
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (the message names the value)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def writable_file(path: str | os.PathLike, what: str) -> Path:
    """Checks, before long work starts, that a file can be written at `path` (its missing
    folders made then). Returns it as a Path; ValueError naming `what` otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file name")
    _check_folder(path.parent, f"{what} {path}")
    return path


def writable_folder(path: str | os.PathLike, what: str) -> Path:
    """As `writable_file`, for an output folder."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file; give a folder")
    _check_folder(path, f"{what} {path}")
    return path


def _check_folder(folder: Path, what: str) -> None:
    """The nearest existing folder on the way to `folder` takes a file. Creates nothing: the
    real write makes the folders."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} cannot be written: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(f"{what} cannot be written: {err.strerror or err}") from None


#: Set to 1 to see the Python traceback behind a one-line CLI error.
TRACEBACK_ENV = "HAAQI_JAX_TRACEBACK"


#: What an out-of-memory line tells the user of a command with a --batch-size option.
BATCH_SIZE_HINT = "pass a smaller --batch-size, or cut long clips into parts"


def run_guarded(prog: str, job: Callable[[], int], *, interrupted: str,
                memory_hint: str = BATCH_SIZE_HINT) -> int:
    """Runs a command's job at the boundary between the user and the library.

    A ValueError or OSError (a bad file, path or setting: each names its cause) becomes one
    line on stderr and exit code 2, and so does running out of memory (ending with
    `memory_hint`, what to do about it in this command's own options); HAAQI_JAX_TRACEBACK=1
    re-raises them instead. Ctrl-C prints `interrupted` and gives 130. Other exceptions are
    bugs and keep their traceback.
    """
    try:
        return int(job() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except (ValueError, OSError, MemoryError, RuntimeError) as err:
        out_of_memory = host_memory.is_out_of_memory(err)
        if isinstance(err, RuntimeError) and not out_of_memory:
            raise                                                  # a bug: keep the traceback
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        message = err
        if out_of_memory:
            message = (f"out of memory ({host_memory.out_of_memory_summary(err)}); memory "
                       f"grows with clip length and batch size: {memory_hint}")
        print(f"{prog}: error: {message} (set {TRACEBACK_ENV}=1 for the traceback)",
              file=sys.stderr)
        return 2


def add_import_argument(parser: argparse.ArgumentParser, when: str) -> None:
    """--import MODULE (repeatable, into args.imports), for `import_user_module`; `when` ends
    its help."""
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="import a module (a name importable from here, "
                        "or a .py file) that registers your own encoder or loss, " + when)


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """`--dtype`, the model's compute dtype (`model.compute_dtype` checks the name in `run`,
    so that `--help` imports no JAX)."""
    parser.add_argument("--dtype", default="float32",
                        help="compute dtype of the model's matmuls and activations: float32 "
                             "(default) or bfloat16 (TPUs, recent GPUs; slower on most CPUs)")


def import_user_module(name: str) -> None:
    """Imports `name`: a module importable from the current folder, or a .py file. ValueError
    naming it when it cannot be found; errors inside it keep their traceback."""
    if name.endswith(".py") or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(f"--import {name}: no such file")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())           # as `python -m` would find it
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name.split(".")[0] and err.name != name:
            raise
        raise ValueError(f"--import {name}: no module of that name here (give its .py file, or "
                         f"run from its folder)") from None


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand. Exit codes: 0 done, 1 done but some items failed (named), 2 a
    usage or input error (one line on stderr), 130 interrupted (finished work is kept)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    host_memory.keep_freed_memory()  # a process setting: see haaqi_jax/host_memory.py
    module = importlib.import_module(SUBCOMMANDS[args.command][0])

    def job() -> int:
        for name in args.imports:
            import_user_module(name)
        return module.run(args)

    return run_guarded(f"haaqi-jax {args.command}", job,
                       interrupted="interrupted; finished work is kept"
                       + (" (run the same command again to resume)"
                          if args.command in RESUMABLE else ""))


def exit_with(code: int, *, at_once: bool = False) -> NoReturn:
    """sys.exit(code); after Ctrl-C (130), or on any error with `at_once`, without the
    interpreter's teardown. After Ctrl-C XLA may still be compiling or running on its own
    threads, and finalising Python under them crashed with SIGSEGV (8 of 8 interrupts of a
    20-row `label` 5-8 s in); a failing process of a multi-host job would wait in JAX's
    shutdown for the others, which wait for it. Output is flushed first; files were closed as
    the error unwound."""
    if code == 130 or (at_once and code):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def console_main() -> NoReturn:
    """The `haaqi-jax` script."""
    exit_with(main())


if __name__ == "__main__":
    console_main()
