"""HAAQI-Net speed on this CPU: prediction (released-size BEATs + head), head-only training on
cached features, end-to-end training; the PyTorch reference pipeline timed for context.

    python benchmarks/bench_haaqinet.py [--quick] [--skip-end-to-end] [--unfrozen] [--repeats N]

Sections (all random weights, released BEATs_iter3+ AS2M size, 12 x 768):
  (a) predict one 10 s, 16 kHz clip, feature modes "last" and "weighted" (layers 1..12):
      `HAAQINet.predict` (the user path: validation, 16 kHz check, padding to the length bucket,
      187200 samples for 10 s) and the jitted `HAAQINet.apply` on exactly 160000 samples;
      warm median of several runs, plus compile time (first call minus warm median).
      Target: warm predict <= 1.0 s (PASS/MISS). Reference: speechbrain 1.1.2 BEATs + the torch
      head of tests/haaqinet_reference.py on the same 160000 samples, in a subprocess whose
      runs interleave with the JAX runs; the JAX/torch time ratio is printed.
  (b) head-only train steps/s on cached features (B, T, 768) / (B, 12, T, 768), batch 8,
      T = 496 (10 s), with the training loop's own pieces (loop.make_forward,
      steps.make_train_step, steps.jit_steps, state.make_optimizer, the haaqi_mse loss).
  (c) end-to-end train steps/s on waveforms, batch 2 x 10 s, encoder frozen (as released), and
      with --unfrozen also the encoder trained (full backward through BEATs; one timed step).
Wall time on 2 cores: default ~1.2 min when the machine is quiet, ~3.5 min at load ~5 (other
jobs); --unfrozen adds ~15 s quiet, ~80 s loaded.
Other jobs on the machine inflate every figure: compare ratios measured in one run.
Peak RSS is reported per section (VmHWM, reset between sections where the kernel allows it)
and for the torch subprocess on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from process_memory import reset_peak, status_mb

REPO = Path(__file__).resolve().parents[1]
SR = 16000
CLIP_SECONDS = 10.0
TARGET_PREDICT_S = 1.0
AUDIOGRAM = [10.0, 15.0, 20.0, 30.0, 40.0, 45.0, 50.0, 55.0]
HEAD_BATCH = 8
E2E_BATCH = 2


# ----------------------------------------------------------------------------- memory


_PEAK_MB = [0.0]  # highest VmHWM seen in this process (resets make VmHWM per section)


class Section:
    """Times nothing itself; records peak RSS of the code inside (VmHWM after a reset)."""

    def __enter__(self):
        _PEAK_MB[0] = max(_PEAK_MB[0], status_mb("VmHWM"))
        self.reset = reset_peak()
        self.start_rss = status_mb("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak_mb = status_mb("VmHWM")
        _PEAK_MB[0] = max(_PEAK_MB[0], self.peak_mb)
        return False


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _clip(seconds: float = CLIP_SECONDS, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    return (0.1 * rng.normal(size=int(seconds * SR))).astype(np.float32)


# ----------------------------------------------------------------------------- JAX side


def jax_predict(repeats: int, results: dict, torch_ref: "TorchReference | None",
                failures: list[str]) -> None:
    """(a): net.predict and net.apply warm medians and compile times, last + weighted;
    the torch reference's runs interleaved with them."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from haaqi_jax.beats import RELEASED_CONFIG
    from haaqi_jax.head import HAAQINetHead
    from haaqi_jax.model import HAAQINet, HAAQINetConfig

    clip = _clip()
    wav = jnp.asarray(clip[None])
    hl = jnp.asarray([AUDIOGRAM], jnp.float32)
    cfg_last = HAAQINetConfig(encoder_config=dict(RELEASED_CONFIG), feature_mode="last")
    with Section() as mem:
        start = time.perf_counter()
        net_last = HAAQINet.init_random(cfg_last, seed=0)
        jax.block_until_ready(net_last.params)
        results["init_random_s"] = time.perf_counter() - start
    if torch_ref is not None:
        try:
            torch_ref.ready()
        except Exception as e:  # JAX figures without the reference
            failures.append(f"torch reference failed to start: {e}")
            torch_ref = None
    nets = {"last": net_last}
    # "weighted": same encoder, its own head (init_random would re-trace the whole encoder).
    cfg_w = HAAQINetConfig(encoder_config=dict(RELEASED_CONFIG), feature_mode="weighted")
    head_w = HAAQINetHead(cfg_w.head).init(
        jax.random.key(1), jnp.zeros((1, 12, 8, 768)), jnp.ones((1, 8), bool),
        jnp.zeros((1, 8)))["params"]
    nets["weighted"] = HAAQINet.from_params(
        cfg_w, {"encoder": net_last.params["encoder"], "head": head_w})

    for mode, net in nets.items():
        row = {}
        with Section() as mem:
            calls = {
                "predict": lambda: net.predict([clip], SR, AUDIOGRAM, progress=False),
                "apply": lambda: net.apply(wav, None, hl).clip_score.block_until_ready()}
            if torch_ref is not None:
                calls["torch"] = lambda: torch_ref.run(mode)
            cold, times = {}, {name: [] for name in calls}
            for name, call in calls.items():
                start = time.perf_counter()
                out = call()
                cold[name] = time.perf_counter() - start
                if name == "predict":
                    scores = out
            for _ in range(repeats):  # interleaved: a load spike from other jobs hits all
                for name, call in calls.items():
                    times[name].append(call() if name == "torch" else
                                       _median_time(call, 1)[0])
            for name in calls:
                row[f"{name}_s"] = statistics.median(times[name])
                row[f"{name}_min_s"] = min(times[name])
                row[f"{name}_compile_s"] = cold[name] - row[f"{name}_s"]
        row["peak_mb"], row["start_mb"] = mem.peak_mb, mem.start_rss
        row["score"] = float(np.asarray(scores)[0])
        results[f"predict_{mode}"] = row
    results["predict_peak_reset"] = mem.reset
    # Host copy of the "last" net's weights: section (c) trains from them (same config and
    # seed as its own init_random would give) instead of paying init_random again.
    results["_params_last"] = jax.tree_util.tree_map(np.array, net_last.params)


def _train_config(freeze_encoder: bool, feature_mode: str, batch_size: int):
    """configs/haaqinet_beats.py (released encoder, paper's optimizer) with these overrides."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_bench_cfg", REPO / "configs" / "haaqinet_beats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.freeze_encoder = freeze_encoder
    c.model.feature_mode = feature_mode
    c.train.batch_size = batch_size
    c.train.progress = False
    return c


def _build_step(config, net_cfg, params, mode: str):
    """The loop's own wiring (loop.train_and_evaluate): labels, optimizer, state, jitted step."""
    from haaqi_jax import config as cfglib
    from haaqi_jax import losses
    from haaqi_jax.train import loop, sharding
    from haaqi_jax.train import state as state_lib
    from haaqi_jax.train import steps as steps_lib

    mesh = sharding.make_mesh()
    labels = state_lib.param_labels(params, loop.frozen_patterns(config))
    tx = state_lib.make_optimizer(config.optimizer, labels, 1000)
    state = sharding.replicate(state_lib.create_train_state(params, tx, int(config.seed)), mesh)
    loss_fn = losses.get_loss(config.loss.name,
                              **cfglib.to_dict(config.loss.get("kwargs") or {}))
    forward = loop.make_forward(net_cfg, mode)
    train_step, _ = steps_lib.jit_steps(steps_lib.make_train_step(forward, loss_fn, tx, labels),
                                        steps_lib.make_eval_step(forward, loss_fn), mesh)
    trainable = state_lib.count_params(params, labels)
    return state, train_step, mesh, loop.BATCH_KEYS[mode], trainable


def _time_steps(state, train_step, batch, steps: int) -> tuple[dict, object]:
    import jax

    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    loss = float(metrics["loss"])
    if loss != loss:
        raise ValueError("train step gave a NaN loss")
    return {"step_s": step_s, "steps_per_s": 1.0 / step_s, "compile_s": first - step_s,
            "timed_steps": steps, "loss": loss}, state


def jax_head_train(steps: int, modes: list[str], results: dict) -> None:
    """(b): head-only steps on random cached features, batch 8, T = 496."""
    import jax
    import numpy as np

    from haaqi_jax.head import HAAQINetHead
    from haaqi_jax.model import tokens_for_samples
    from haaqi_jax.train import loop, sharding

    tokens = tokens_for_samples(int(CLIP_SECONDS * SR))
    rng = np.random.default_rng(0)
    for mode in modes:
        config = _train_config(True, mode, HEAD_BATCH)
        net_cfg = loop.build_model_config(config)
        shape = (HEAD_BATCH, tokens, 768) if mode == "last" else \
            (HEAD_BATCH, len(net_cfg.feature_layers), tokens, 768)
        with Section() as mem:
            batch = {"features": rng.normal(size=shape).astype(np.float32),
                     "token_mask": np.ones((HEAD_BATCH, tokens), bool),
                     **_label_fields(rng, HEAD_BATCH)}
            head = HAAQINetHead(net_cfg.head).init(
                jax.random.key(0), batch["features"][:1, ..., :8, :],
                batch["token_mask"][:1, :8], batch["audiogram"][:1])["params"]
            state, train_step, mesh, keys, trainable = _build_step(
                config, net_cfg, {"head": head}, "features")
            row, state = _time_steps(state, train_step,
                                     sharding.shard_batch(batch, mesh, keys), steps)
            del state
        row.update(peak_mb=mem.peak_mb, start_mb=mem.start_rss, trainable=trainable,
                   tokens=tokens)
        results[f"head_{mode}"] = row


def _label_fields(rng, batch_size: int) -> dict:
    """A batch's label fields as the training pipeline makes them (so that the benchmark's
    batches follow the pipeline's format), for random labels."""
    import numpy as np

    from haaqi_jax.data.manifest import ManifestRow
    from haaqi_jax.data.pipeline import row_fields

    rows = [ManifestRow(id=str(i), file_path=f"clip{i}.wav", audiogram=AUDIOGRAM,
                        haaqi_score=float(rng.uniform())) for i in range(batch_size)]
    return row_fields(rows, np.arange(batch_size), np.ones(batch_size, bool))


def jax_end_to_end(steps: int, unfrozen_steps: int, results: dict) -> None:
    """(c): waveform steps, batch 2 x 10 s, released-size BEATs frozen (and unfrozen)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from haaqi_jax.model import HAAQINet
    from haaqi_jax.train import loop, sharding

    rng = np.random.default_rng(1)
    n = int(CLIP_SECONDS * SR)
    batch = {"waveform": np.stack([_clip(seed=i) for i in range(E2E_BATCH)]),
             "padding_mask": np.zeros((E2E_BATCH, n), bool),
             **_label_fields(rng, E2E_BATCH)}
    params = None
    for frozen in ([True, False] if unfrozen_steps else [True]):
        config = _train_config(frozen, "last", E2E_BATCH)
        net_cfg = loop.build_model_config(config)
        with Section() as mem:
            if params is None:  # section (a)'s init_random weights, else a fresh one
                params = results.pop("_params_last", None) or jax.tree_util.tree_map(
                    np.array, HAAQINet.init_random(net_cfg, seed=0).params)
            # A fresh device copy each time: the jitted step donates (frees) its state.
            state, train_step, mesh, keys, trainable = _build_step(
                config, net_cfg, jax.tree_util.tree_map(jnp.array, params), "waveform")
            row, state = _time_steps(state, train_step, sharding.shard_batch(batch, mesh, keys),
                                     steps if frozen else unfrozen_steps)
            del state
        row.update(peak_mb=mem.peak_mb, start_mb=mem.start_rss, trainable=trainable)
        results["e2e_frozen" if frozen else "e2e_unfrozen"] = row


# ----------------------------------------------------------------------------- torch side


def torch_worker() -> None:
    """The reference side, a subprocess driven over stdin/stdout so that its runs interleave
    with the JAX runs (both see the same load from other jobs) while keeping its own RSS.

    Builds speechbrain BEATs (released size, random checkpoint) + the torch heads, prints
    {"ready", "threads"}; then for each line "last" / "weighted" runs that pipeline once on a
    10 s clip and prints {"s": seconds}; on "quit" prints {"peak_mb", "peak_delta_mb"}.
    """
    import tempfile

    import torch

    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # noqa: F401  (bare torchaudio package so that speechbrain imports)
    import beats_reference as beats_ref
    import haaqinet_reference as head_ref

    base = status_mb("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        path = beats_ref.save_official_checkpoint(
            Path(tmp) / "released.pt", beats_ref.RELEASED_CFG,
            beats_ref.make_beats_state_dict(beats_ref.RELEASED_CFG, 0))
        beats = beats_ref.speechbrain_beats(path)
    heads = {"last": head_ref.make_head(0),
             "weighted": head_ref.make_head(0, num_weighted_layers=12)}
    wav = torch.from_numpy(_clip()[None])
    lens = torch.ones(1)
    hl = torch.tensor([AUDIOGRAM], dtype=torch.float32)

    def pipeline(mode):
        beats.output_all_hiddens = mode == "weighted"
        out = beats(wav, lens)
        if mode == "weighted":   # hidden (L+1, T, B, C): layers 1..12 as (B, T, C)
            features = [out[0][i].transpose(0, 1) for i in range(1, 13)]
        else:
            features = out[0]
        return heads[mode](features, hl)[1]

    def reply(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "threads": torch.get_num_threads()})
    with torch.no_grad():
        for line in sys.stdin:
            mode = line.strip()
            if mode == "quit":
                break
            reply({"s": _median_time(lambda: pipeline(mode), 1)[0]})
    peak = status_mb("VmHWM")
    reply({"peak_mb": peak, "peak_delta_mb": peak - base})


class TorchReference:
    """Handle on the `torch_worker` subprocess."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__, "--side", "torch"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = None

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"torch reference worker exited (rc {self.proc.wait()}); "
                               "see its stderr above")
        return json.loads(line)

    def ready(self) -> dict:
        if self.info is None:
            self.info = self._read()
        return self.info

    def run(self, mode: str) -> float:
        self.ready()
        self.proc.stdin.write(mode + "\n")
        self.proc.stdin.flush()
        return self._read()["s"]

    def close(self) -> dict:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            return self._read()
        finally:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------- report


def _fmt_s(x: float) -> str:
    return f"{x * 1e3:8.0f} ms" if x < 10 else f"{x:8.1f} s "


def _rss(row: dict) -> str:
    return f"{row['start_mb']:6.0f}->{row['peak_mb']:.0f} MB".rjust(16)


def print_report(r: dict, torch_r: dict | None, args) -> None:
    load = os.getloadavg()
    print()
    print(f"HAAQI-Net benchmark: released-size BEATs (12 x 768), random weights, "
          f"{os.cpu_count()} CPUs, load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at end"
          f"{' (--quick)' if args.quick else ''}")
    print(f"  init_random: {r['init_random_s']:.1f} s (torch worker starting meanwhile); load "
          f"at start "
          f"{r['load_at_start']}; torch threads: "
          f"{torch_r['threads'] if torch_r else '-'}")
    print()
    print(f"(a) predict one 10 s clip, warm median of {args.repeats} runs, JAX predict / JAX "
          f"apply / torch interleaved; compile = first call - warm")
    header = f"  {'mode':9} {'path':28} {'warm':>11} {'(best)':>9} {'compile':>9} " \
             f"{'torch ref':>11} " \
             f"{'jax/torch':>9} {'RSS start->peak':>16}  target <= {TARGET_PREDICT_S:.1f} s"
    print(header)
    for mode in ("last", "weighted"):
        row = r.get(f"predict_{mode}")
        if row is None:
            continue
        t = row.get("torch_s")
        for path, key, note in (("predict (bucket 187200 smp)", "predict", True),
                                ("apply (160000 smp)", "apply", False)):
            warm = row[f"{key}_s"]
            ratio = f"{warm / t:8.2f}x" if t else "      n/a"
            verdict = ("PASS" if warm <= TARGET_PREDICT_S else "MISS")
            print(f"  {mode:9} {path:28} {_fmt_s(warm)} {row[f'{key}_min_s'] * 1e3:6.0f} ms "
                  f"{row[f'{key}_compile_s']:7.1f} s "
                  f"{_fmt_s(t) if t else '        n/a'} {ratio} "
                  f"{_rss(row)}  {verdict}")
    if torch_r:
        print(f"  torch reference (speechbrain BEATs + torch head, 160000 samples, no_grad): "
              f"peak RSS {torch_r['peak_mb']:.0f} MB (+{torch_r['peak_delta_mb']:.0f} MB "
              f"over imports)")
    print()
    print("(b)/(c) train steps (the loop's jitted step, Adam), warm median; "
          "compile = first step - warm")
    print(f"  {'what':44} {'step':>11} {'steps/s':>8} {'compile':>9} {'trainable':>11} "
          f"{'RSS start->peak':>16}")
    rows = [("head_last", "head-only, cached (8, 496, 768)"),
            ("head_weighted", "head-only, cached (8, 12, 496, 768)"),
            ("e2e_frozen", "end-to-end, encoder frozen, 2 x 10 s"),
            ("e2e_unfrozen", "end-to-end, encoder trained, 2 x 10 s")]
    for key, label in rows:
        row = r.get(key)
        if row is None:
            print(f"  {label:44} {'skipped':>11}")
            continue
        print(f"  {label:44} {_fmt_s(row['step_s'])} {row['steps_per_s']:8.2f} "
              f"{row['compile_s']:7.1f} s {row['trainable']:11,d} {_rss(row)}")
    print()
    print(f"  peak RSS of the JAX process overall: {r['peak_rss_total_mb']:.0f} MB "
          f"(start = RSS entering the section, peak = VmHWM reset there: "
          f"{'yes' if r.get('predict_peak_reset') else 'NO, cumulative'})")
    print("  wall time per section: " + ", ".join(
        f"{k} {v:.0f} s" for k, v in r.get("section_s", {}).items())
        + f"; total {r['wall_s']:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats (3 predict runs, 2 train steps), no weighted "
                             "head-only training")
    parser.add_argument("--skip-end-to-end", action="store_true",
                        help="skip section (c), the end-to-end train steps")
    parser.add_argument("--unfrozen", action="store_true",
                        help="also time one end-to-end step with the encoder trained "
                             "(~5.5 GB peak RSS; +15 s on 2 quiet cores, +80 s loaded)")
    parser.add_argument("--repeats", type=int, default=0,
                        help="warm runs per timed prediction (default 5, --quick 3)")
    parser.add_argument("--side", choices=["torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 5)

    if args.side == "torch":
        torch_worker()
        return 0

    sys.path.insert(0, str(REPO))
    wall = time.perf_counter()
    results: dict = {"load_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    failures = []

    # The torch reference lives in its own process (own RSS, no thread pools fighting JAX's;
    # haaqi_jax never imports torch); it builds its model while JAX runs init_random.
    torch_ref, torch_r = TorchReference(), None

    def predict_section():
        jax_predict(args.repeats, results, torch_ref, failures)

    head_steps = 2 if args.quick else 5
    e2e_steps = 1 if args.quick else 2
    unfrozen_steps = 1 if args.unfrozen else 0
    sections = [("(a) predict", predict_section),
                ("(b) head-only train", lambda: jax_head_train(
                    head_steps, ["last"] if args.quick else ["last", "weighted"], results))]
    if not args.skip_end_to_end:
        sections.append(("(c) end-to-end train", lambda: jax_end_to_end(
            e2e_steps, unfrozen_steps, results)))
    for name, run in sections:
        print(f"{name} ...", flush=True)
        start = time.perf_counter()
        try:
            run()
        except Exception as e:  # report the others' figures anyway
            failures.append(f"{name} failed: {type(e).__name__}: {e}")
        results.setdefault("section_s", {})[name] = time.perf_counter() - start
        if torch_ref is not None and torch_r is None:  # (a) is done with it
            try:
                torch_r = dict(torch_ref.ready(), **torch_ref.close())
            except Exception as e:
                failures.append(f"torch reference failed: {e}")
            torch_ref = None
    results["wall_s"] = time.perf_counter() - wall
    # Not ru_maxrss: the per-section VmHWM resets lower it too.
    results["peak_rss_total_mb"] = max(_PEAK_MB[0], status_mb("VmHWM"))
    if "init_random_s" in results:
        print_report(results, torch_r, args)
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
