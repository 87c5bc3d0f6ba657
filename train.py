"""Train HAAQI-Net from a config file (configs/*.py) with --set overrides.

    python train.py [--config configs/default.py] [--set key=value ...] [--workdir DIR]
                    [--import MODULE]

With no arguments it runs the demo job (configs/default.py): build/reuse the demo dataset,
train the head on cached encoder features, evaluate, write runs/default/report/. Running the
same command again with the same workdir resumes from the latest checkpoint.

Exit codes: 0 done; 2 bad data or settings (one line on stderr; HAAQI_JAX_TRACEBACK=1 shows the
traceback); 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from haaqi_jax import config as cfglib


def _split_scores(metrics_file: Path) -> str:
    """'LCC / SRCC: valid 0.947 / 0.941, ...' from a report's metrics.json (n/a for a split
    too small to correlate)."""
    import json
    import math
    by_split = json.loads(metrics_file.read_text()).get("by_split", {})
    cell = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"  # noqa: E731
    return "LCC / SRCC: " + ", ".join(f"{split} {cell(m.get('lcc'))} / {cell(m.get('srcc'))}"
                                      for split, m in by_split.items())


#: train.py's out-of-memory advice, in its own options (it has no --batch-size).
TRAIN_MEMORY_HINT = ("lower --set train.batch_size=N (and train.eval_batch_size), or train on "
                     "random crops of long clips (--set data.crop_seconds=S --set "
                     "data.cache=False)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="exit codes: " + " ".join(__doc__.split("Exit codes:")[1].split()))
    parser.add_argument("--config", default="configs/default.py",
                        help="Python config file with get_config() (a relative path not found "
                        "here is looked up next to train.py)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value (repeatable), "
                        "e.g. --set train.num_epochs=3")
    parser.add_argument("--workdir", default=None,
                        help="output folder (default: runs/<config name>)")
    parser.add_argument("--compilation-cache", default="data_cache/jax_compilation",
                        metavar="DIR", help="JAX's persistent compilation cache: reruns and "
                        "sweeps skip compiles done before (default: %(default)s; 'none' = off; "
                        "JAX_COMPILATION_CACHE_DIR, when set, wins)")
    from haaqi_jax.cli import add_import_argument, import_user_module
    add_import_argument(parser, "before the config is read, for --set loss.name=... "
                                "(repeatable)")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-host: call jax.distributed.initialize() first (run the same "
                        "command on every host; on TPU pods, SLURM, Open MPI and Kubernetes "
                        "the processes are found automatically; see "
                        "haaqi_jax/train/sharding.py)")
    parser.add_argument("--coordinator", metavar="HOST:PORT",
                        help="multi-host elsewhere: process 0's address and a free port, the "
                        "same on every host (implies --distributed; needs --num-processes and "
                        "--process-id)")
    parser.add_argument("--num-processes", type=int, metavar="N",
                        help="with --coordinator: how many processes take part")
    parser.add_argument("--process-id", type=int, metavar="I",
                        help="with --coordinator: this process's number, 0..N-1 (0 runs the "
                        "coordinator and writes the logs and the report)")
    args = parser.parse_args(argv)
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        parser.error("--coordinator, --num-processes and --process-id go together")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        parser.error(f"--process-id {args.process_id} is not in 0..{args.num_processes - 1}")
    from haaqi_jax import host_memory
    host_memory.keep_freed_memory()  # XLA's CPU scratch reused, not page-faulted afresh
    import jax
    if args.compilation_cache.lower() != "none" and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        # The many sub-second CPU compiles (one per length bucket) are worth keeping too.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if args.coordinator is not None:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        jax.distributed.initialize()  # coordinator/process ids from the cluster environment

    try:
        for name in args.imports:
            import_user_module(name)
        config_file = Path(args.config)
        if not config_file.is_file() and not config_file.is_absolute() \
                and (Path(__file__).parent / config_file).is_file():
            config_file = Path(__file__).parent / config_file   # run from another folder
        cfglib.check_distinct_overrides(args.overrides)
        config = cfglib.get_config(config_file, args.overrides)
    except (ValueError, FileNotFoundError) as err:   # one line, as for errors that come later
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
    from haaqi_jax.cli import run_guarded, writable_folder
    from haaqi_jax.train.loop import train_and_evaluate  # after parsing: --help stays fast

    def job() -> int:
        result = train_and_evaluate(cfglib.freeze(config), writable_folder(workdir, "--workdir"))
        if result.report_dir is not None and jax.process_index() == 0:
            if result.stopped_early:
                print(f"stopped early at step {result.final_step}: no better validation "
                      f"{result.monitor} for {int(config.train.patience)} epochs "
                      f"(train.patience, train.monitor)")
            if result.monitor != "loss":
                best = "undefined" if result.best_value is None else f"{result.best_value:.5f}"
                print(f"best valid {result.monitor} {best} (train.monitor) at step "
                      f"{result.best_step}, valid loss {result.best_valid_loss:.5f}; report in "
                      f"{result.report_dir}")
            else:
                print(f"best valid loss {result.best_valid_loss:.5f} at step "
                      f"{result.best_step}; report in {result.report_dir}")
            print(_split_scores(result.report_dir / "metrics.json"))
        return 0

    # Bad data or settings: one line naming the file, row or key, exit 2.
    code = run_guarded("train.py", job, interrupted="interrupted; the same command resumes "
                       "from the last checkpoint", memory_hint=TRAIN_MEMORY_HINT)
    if code and (args.coordinator is not None or args.distributed):
        # Leave at once: JAX's shutdown would wait up to 5 minutes for the other processes,
        # which wait for this one; its exit stops them within seconds.
        from haaqi_jax.cli import exit_with
        exit_with(code, at_once=True)
    return code


if __name__ == "__main__":
    from haaqi_jax.cli import exit_with
    exit_with(main())   # after Ctrl-C without Python's teardown (see exit_with)
