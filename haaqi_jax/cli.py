"""`haaqi-jax` command line: one subcommand per job, each implemented next to its concept.

Each subcommand's module provides `add_arguments(parser)` and `run(args) -> int`; they are
imported only when their subcommand runs, so `haaqi-jax --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haaqi-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen subcommand's module is imported.
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    host_memory.keep_freed_memory()  # a process setting: see haaqi_jax/host_memory.py
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
