"""Inference time of distillBEATs vs BEATs at the released sizes, per 10 s clip (batch 1).

    python benchmarks/bench_student.py [--seconds 10] [--repeats 15] [--layers 0 1 2]
                                       [--batch 1] [--breakdown] [--train-step 2]

Random weights in the released shapes (timing does not depend on the values): a HAAQI-Net
with BEATs_iter3+ (12 layers, 90,311,792 encoder parameters) and the student built from it by
`student_from_teacher` (3 layers, 21,802,812). Teacher and student are timed interleaved
(`haaqi_jax.distill.time_inference`: one compile excluded, then rounds in which every forward
runs once, in rotating order), so load on a shared machine hits both alike. Prints min and
median seconds per clip and the student/teacher ratios (of minima, of medians, median of the
per-round ratios) for the encoders alone and for whole HAAQI-Nets (encoder + head).
Target: whole model <= 0.25. `--batch B` times forwards of B clips instead (per clip), as
batched evaluation runs them. Like the `haaqi-jax` CLI and train.py, it first calls
`haaqi_jax.host_memory.keep_freed_memory()` (XLA's scratch reused, not page-faulted afresh).

--head-pieces times the released head's pieces alone (same shapes, interleaved): what the
head costs at the least when each piece runs as fast as XLA runs it alone.

--train-step B times one distillation step at batch B x `--seconds` (released sizes): the
step that runs the teacher vs the step on cached targets (`distill.cache_targets`), interleaved.

--breakdown also times the pieces, interleaved the same way: fbank, front end (patch
embedding, LayerNorm, projection), one relative-position table, one transformer layer, the
teacher's positional convolution (+ LayerNorm), the HAAQI-Net head; and prints what the
student spends beyond its transformer layers. The whole-model ratio is at most 0.25 exactly
when 3 (fbank + front end + head) + 11 table <= positional conv (3 student layers = a quarter
of the teacher's 12).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _min_median(runs: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """{name: {"min", "median"}} seconds of `distill.interleaved_runs`' timings."""
    return {k: {"min": float(np.min(v)), "median": float(np.median(v))} for k, v in runs.items()}


def _breakdown(teacher, student, seconds: float, repeats: int) -> dict[str, dict[str, float]]:
    """min / median seconds of each piece on one clip, interleaved."""
    import flax.linen as nn

    from haaqi_jax import beats as beats_lib
    from haaqi_jax import distill as distill_lib
    from haaqi_jax import fbank as fbank_lib
    from haaqi_jax.head import HAAQINetHead

    cfg = beats_lib.BEATsConfig.from_dict(dict(teacher.config.encoder_config))
    tp = jax.device_put(teacher.params)
    wav = jnp.asarray(0.1 * np.random.default_rng(0).standard_normal((1, int(seconds * 16000))),
                      jnp.float32)
    fbank = jax.jit(lambda w: fbank_lib.normalize_fbank(fbank_lib.kaldi_fbank(w)[0]))
    feats = fbank(wav)
    front_end = beats_lib.BEATsFrontEnd(cfg)
    front = jax.jit(lambda p, f: front_end.apply({"params": p}, f,
                                                 jnp.zeros(f.shape[:2], bool))[0])
    x = front(tp["encoder"]["front_end"], feats)
    pos_conv = beats_lib.PositionalConv(cfg)
    layer_norm = nn.LayerNorm(epsilon=beats_lib.LAYER_NORM_EPS)
    pos = jax.jit(lambda p, ln, x: layer_norm.apply({"params": ln},
                                                    x + pos_conv.apply({"params": p}, x)))
    table = beats_lib.RelativePositionBias(cfg)
    bias_fn = jax.jit(lambda p: table.apply({"params": p}, x.shape[1]))
    bias = bias_fn(tp["encoder"]["relative_position_bias"])
    layer = beats_lib.BEATsEncoderLayer(cfg)
    layer_fn = jax.jit(lambda p, x, b: layer.apply({"params": p}, x, jnp.zeros(x.shape[:2], bool),
                                                   b))
    head = HAAQINetHead(teacher.config.head)
    hl = jnp.zeros((1, 8), jnp.float32)
    head_fn = jax.jit(lambda p, x: head.apply({"params": p}, x, jnp.ones(x.shape[:2], bool),
                                              hl).clip_score)
    jobs = {"fbank": lambda: fbank(wav),
            "front_end": lambda: front(tp["encoder"]["front_end"], feats),
            "position_table": lambda: bias_fn(tp["encoder"]["relative_position_bias"]),
            "layer": lambda: layer_fn(tp["encoder"]["layers_0"], x, bias),
            "pos_conv": lambda: pos(tp["encoder"]["pos_conv"],
                                    tp["encoder"]["encoder_layer_norm"], x),
            "head": lambda: head_fn(tp["head"], x)}
    runs = distill_lib.interleaved_runs(jobs, repeats)
    return _min_median(runs)


def _head_pieces(tokens: int, repeats: int) -> dict[str, dict[str, float]]:
    """min / median seconds of the released head's pieces on one clip of `tokens` tokens,
    interleaved: what the head (shared by teacher and student) costs at the least."""
    from haaqi_jax import attention as attention_lib
    from haaqi_jax import distill as distill_lib
    from haaqi_jax.head import HeadConfig, lstm_recurrence

    cfg = HeadConfig()
    rng = np.random.default_rng(0)
    arr = lambda *shape: jnp.asarray(0.05 * rng.standard_normal(shape), jnp.float32)
    hidden, heads = cfg.lstm_hidden, cfg.num_heads
    width = cfg.adapter_dim + cfg.audiogram_dim
    features, adapter = arr(1, tokens, 768), arr(768, cfg.adapter_dim)
    lstm_in, gates_in = arr(1, tokens, width), arr(width, 2 * 4 * hidden)   # both directions
    gates, recurrent = arr(2, 1, tokens, 4 * hidden), arr(2, hidden, 4 * hidden)
    lstm_out, dense = arr(1, tokens, 2 * hidden), arr(2 * hidden, cfg.dense_dim)
    dense_out, query_key = arr(1, tokens, cfg.dense_dim), arr(cfg.dense_dim, 2 * cfg.dense_dim)
    q = arr(1, heads, tokens, cfg.dense_dim // heads)
    v = arr(1, heads, tokens, 1)                      # the folded readout: one value per head
    mask = jnp.ones((1, tokens), bool)
    fns = {"adapter": (jax.jit(lambda x, w: x @ w), (features, adapter)),
           "lstm_input": (jax.jit(lambda x, w: x @ w), (lstm_in, gates_in)),
           "lstm_recurrence": (jax.jit(lstm_recurrence), (gates, recurrent)),
           "dense": (jax.jit(lambda x, w: jax.nn.relu(x @ w)), (lstm_out, dense)),
           "query_key": (jax.jit(lambda x, w: x @ w), (dense_out, query_key)),
           "attention_core": (jax.jit(lambda q, v, m: attention_lib.attend(q, q, v, m)),
                              (q, v, mask))}
    jobs = {name: (lambda f=f, a=a: f(*a)) for name, (f, a) in fns.items()}
    runs = distill_lib.interleaved_runs(jobs, repeats)
    return _min_median(runs)


def _train_steps(teacher, student, pred_params, batch_size: int, seconds: float,
                 repeats: int) -> dict[str, dict[str, float]]:
    """min / median seconds of a distillation step with and without cached targets."""
    from ml_collections import ConfigDict

    from haaqi_jax import distill, losses
    from haaqi_jax.train import state as state_lib

    targets = (6, 9, 12)
    params = {**student.params, "pred_heads": pred_params,
              "loss": losses.loss_params("distill_uncertainty", len(targets))}
    labels = state_lib.param_labels(params, distill.distill_frozen_patterns(ConfigDict(
        {"distill": {"frozen_head": ("blstm", "attention")}, "train": {}})))
    tx = state_lib.make_optimizer(ConfigDict({"name": "adam", "learning_rate": 1e-4}), labels,
                                  100)
    state = jax.device_put(state_lib.create_train_state(params, tx, 0))
    loss_fn = losses.get_loss("distill_uncertainty", distill="l1_cosine")
    rng = np.random.default_rng(0)
    n = int(seconds * 16000)
    batch = {"waveform": (0.1 * rng.standard_normal((batch_size, n))).astype(np.float32),
             "padding_mask": np.zeros((batch_size, n), bool),
             "audiogram": rng.uniform(0, 60, (batch_size, 8)).astype(np.float32),
             "label": rng.uniform(0, 1, batch_size).astype(np.float32),
             "weight": np.ones(batch_size, np.float32)}
    encode = distill.make_target_encode_fn(teacher, targets)
    batch["targets"] = np.asarray(encode(batch["waveform"], batch["padding_mask"])[0],
                                  np.float16)  # as the cache stores them
    batch = jax.device_put(batch)
    plain = {k: v for k, v in batch.items() if k != "targets"}
    teacher_params = jax.device_put(teacher.params["encoder"])
    with_teacher = jax.jit(distill.make_distill_step(distill.make_distill_forward(
        teacher.config, student.config, targets, "independent"), loss_fn, tx, labels))
    cached = jax.jit(distill.make_distill_step(distill.make_distill_forward(
        None, student.config, targets, "independent", cached_targets=True), loss_fn, tx,
        labels))
    jobs = {"teacher_step": lambda: with_teacher(state, teacher_params, plain),
            "cached_step": lambda: cached(state, batch)}
    runs = distill.interleaved_runs(jobs, repeats)
    return _min_median(runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=1,
                        help="clips per forward (times are per clip; default 1)")
    parser.add_argument("--shared-position-bias", action="store_true",
                        help="one relative-position table for all student layers")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time fbank, front end, tables, one layer, pos conv, head")
    parser.add_argument("--head-pieces", action="store_true",
                        help="also time the head's pieces (adapter, LSTM input projection, "
                             "recurrence, dense, query/key projection, attention core)")
    parser.add_argument("--train-step", type=int, default=0, metavar="B",
                        help="also time a distillation step at batch B, with the teacher vs "
                             "on cached targets")
    args = parser.parse_args(argv)
    if args.breakdown and args.batch != 1:
        parser.error("--breakdown times its pieces on one clip: use it with --batch 1")

    sys.path.insert(0, str(REPO))
    from haaqi_jax import distill, host_memory
    host_memory.keep_freed_memory()  # as the CLI does: no page faults on XLA's scratch
    from haaqi_jax.model import HAAQINet, HAAQINetConfig
    from ml_collections import ConfigDict

    teacher = HAAQINet.init_random(HAAQINetConfig(), seed=0)
    dcfg = ConfigDict({"student_layers": tuple(args.layers),
                       "shared_position_bias": bool(args.shared_position_bias),
                       "feature_mode": "last", "head_init": "teacher",
                       "target_layers": (6, 9, 12), "head_kind": "independent"})
    student, pred_params = distill.init_student(teacher, dcfg, seed=0)
    counts = distill.param_counts(teacher, student)
    load = os.getloadavg()
    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), "
          f"clip {args.seconds:g} s, batch {args.batch}, {args.repeats} interleaved rounds; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"encoder parameters: teacher {counts['teacher_encoder']:,}, student "
          f"{counts['student_encoder']:,} ({100 * counts['encoder_reduction']:.2f} % fewer)")
    times = distill.time_inference({"teacher": teacher, "student": student}, args.seconds,
                                   args.repeats, batch=args.batch)
    ratios = distill.timing_ratios(times)
    for part in ("encoder", "model"):
        t, s, r = times["teacher"][part], times["student"][part], ratios[part]
        print(f"{part:<8} teacher min {t['min']:.4f} s median {t['median']:.4f} s | student "
              f"min {s['min']:.4f} s median {s['median']:.4f} s | ratio of minima "
              f"{r['min']:.3f}, of medians {r['median']:.3f}, paired median "
              f"{r['paired_median']:.3f}")
    if args.breakdown:
        parts = _breakdown(teacher, student, args.seconds, args.repeats)
        n_layers = len(args.layers)
        n_tables = 1 if args.shared_position_bias else n_layers
        print("pieces (min / median ms):")
        for k, v in parts.items():
            print(f"  {k:<15} {1e3 * v['min']:8.2f} {1e3 * v['median']:8.2f}")
        m = {k: v["min"] for k, v in parts.items()}
        shared = m["fbank"] + m["front_end"] + m["head"]
        tables = n_tables * m["position_table"]
        beyond = times["student"]["model"]["min"] - n_layers * m["layer"]
        print(f"student whole model minus {n_layers} layers: {1e3 * beyond:.1f} ms (pieces alone: "
              f"fbank + front end + head {1e3 * shared:.1f} ms, {n_tables} table(s) "
              f"{1e3 * tables:.1f} ms); teacher-only pos conv {1e3 * m['pos_conv']:.1f} ms")
        if 4 * n_layers == 12:  # the layers cancel out when they cost the same in both
            need = 3 * shared + (4 * n_tables - 1) * m["position_table"]
            print(f"ratio <= 0.25 needs 3 x (fbank + front end + head) + {4 * n_tables - 1} x "
                  f"table <= pos conv: {1e3 * need:.1f} <= {1e3 * m['pos_conv']:.1f} ms")
    if args.head_pieces:
        frames = 1 + (int(args.seconds * 16000) - 400) // 160    # 25 ms windows, 10 ms hop
        tokens = 8 * (frames // 16)                    # 16-frame patches x 8 mel patches
        parts = _head_pieces(tokens, args.repeats)
        print(f"head pieces at {tokens} tokens (min / median ms):")
        for k, v in parts.items():
            print(f"  {k:<15} {1e3 * v['min']:8.2f} {1e3 * v['median']:8.2f}")
        print(f"  sum of minima   {1e3 * sum(v['min'] for v in parts.values()):8.2f}")
    if args.train_step:
        steps = _train_steps(teacher, student, pred_params, args.train_step, args.seconds,
                             max(3, args.repeats // 3))
        t, c = steps["teacher_step"], steps["cached_step"]
        print(f"distillation step, batch {args.train_step} x {args.seconds:g} s: running the "
              f"teacher min {t['min']:.3f} s median {t['median']:.3f} s | cached targets min "
              f"{c['min']:.3f} s median {c['median']:.3f} s | cached {t['min'] / c['min']:.2f}x "
              f"faster (minima), {t['median'] / c['median']:.2f}x (medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
