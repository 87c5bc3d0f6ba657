"""Training: the real config shrunk (configs/tiny.py) end to end, exact resumption in a fresh
process, frozen parameters, a falling loss, and clear errors."""

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from haaqi_jax import config as cfglib
from haaqi_jax.train import early_stopping, loop

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.py"


def write_tiny_dataset(out_dir, *, n_train=8, n_valid=4, n_test=2, seconds=1.0, seed=0,
                       unlabelled_row=None, components=False):
    """Short tones with noise or clipping; the label is a logistic function of the SNR (an
    independent rule, so a model that learns anything correlates with it)."""
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = (["train"] * n_train + ["valid"] * n_valid + ["test_seen"] * n_test
              + ["test_unseen"] * n_test)
    rows = []
    for i, split in enumerate(splits):
        n = int(seconds * 16000 * rng.uniform(0.8, 1.0))
        t = np.arange(n) / 16000
        clean = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * t)
        snr_db = rng.uniform(-10, 30)
        noise = rng.standard_normal(n) * np.sqrt(np.mean(clean ** 2) / 10 ** (snr_db / 10))
        kind = "noise" if i % 2 else "clipping"
        x = clean + noise if kind == "noise" else np.clip(clean + noise, -0.1, 0.1)
        sf.write(out_dir / "audio" / f"clip{i:03d}.wav", x.astype(np.float32), 16000,
                 subtype="FLOAT")
        row = {"id": f"clip{i:03d}", "file_path": f"audio/clip{i:03d}.wav",
               "audiogram": [float(v) for v in rng.uniform(0, 60, 8)],
               "haaqi_score": float(1 / (1 + np.exp(-(snr_db - 10) / 6))), "split": split,
               "distortion": kind}
        if components:  # two parts of the label: the SNR rule and the clipping
            row["haaqi_components"] = {"nonlinear": float(1 / (1 + np.exp(-snr_db / 8))),
                                       "linear": 0.3 if kind == "clipping" else 0.9}
        if unlabelled_row == i:
            del row["haaqi_score"]
        rows.append(row)
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    manifest = write_tiny_dataset(root / "data")
    # 8 train rows, batch 2: 4 steps per epoch, 8 steps; checkpoints every 2 steps.
    overrides = [f"data.manifest={manifest}", f"data.cache_dir={root / 'cache'}",
                 "data.cache_dtype=float32", "train.batch_size=2", "train.eval_batch_size=2",
                 "train.num_epochs=2", "train.patience=0", "data.prefetch=0"]
    return root, overrides


def _config(overrides):
    return cfglib.get_config(TINY, overrides)


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def straight_run(tiny):
    root, overrides = tiny
    result = loop.train_and_evaluate(_config(overrides), root / "straight")
    return result


def test_tiny_config_trains_and_reports(straight_run, tiny):
    """One full run of the real default config shrunk: steps, eval each epoch, report."""
    from haaqi_jax.model import HAAQINet

    r = straight_run
    assert r.final_step == 8 and not r.interrupted
    lines = [json.loads(l) for l in (r.workdir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if l["kind"] == "train"] == list(range(1, 9))
    valid = [l for l in lines if l["kind"] == "valid"]
    assert [l["epoch"] for l in valid] == [1, 2]
    # the best step is the logged epoch of least validation loss (numpy's argmin)
    assert r.best_step == valid[int(np.argmin([l["loss"] for l in valid]))]["step"]
    assert all(np.isfinite(l["loss"]) and -1 <= l["lcc"] <= 1 for l in valid)
    saved = json.loads((r.workdir / "config.json").read_text())
    assert saved["train"]["num_epochs"] == 2 and saved["model"]["encoder_kind"] == "fbank_patches"
    rep = r.report_dir
    for name in ("metrics.json", "table.md", "table.csv", "predictions.csv", "examples.json",
                 "scatter.png", "by_distortion.png", "by_hearing_loss.png", "training.json",
                 "curves.png", "manifest.jsonl"):
        assert (rep / name).is_file(), name
    metrics = json.loads((rep / "metrics.json").read_text())
    assert sum(g["n"] for g in metrics["by_hearing_loss"].values()) == metrics["overall"]["n"]
    assert set(metrics["by_split"]) == {"valid", "test_seen", "test_unseen"}
    assert set(metrics["by_distortion"]) == {"noise", "clipping"}
    summary = json.loads((rep / "training.json").read_text())
    assert summary["best_step"] == r.best_step
    assert summary["config"] == saved and summary["seed"] == saved["seed"]

    # The exported best model reproduces the report's predictions from the audio files.
    import csv
    net = HAAQINet.load(rep / "best_model")
    rows = list(csv.DictReader((rep / "predictions.csv").open()))
    data_dir = Path(_config(tiny[1]).data.manifest).parent
    waves = [sf.read(data_dir / "audio" / f"{row['id']}.wav", dtype="float32")[0] for row in rows]
    levels = {json.loads(l)["id"]: json.loads(l)["audiogram"]
              for l in (data_dir / "manifest.jsonl").read_text().splitlines()}
    pred = net.predict(waves, 16000, [levels[row["id"]] for row in rows], progress=False)
    np.testing.assert_allclose(pred, [float(row["prediction"]) for row in rows], atol=2e-5)


def test_resume_in_fresh_process_is_bitwise_exact(straight_run, tiny, capsys):
    """k steps, a crash (after step 5; last checkpoint at 4), a fresh process finishing the
    run (train.py, with its compilation cache): same parameters, optimizer state, and the same
    metrics log, bit for bit."""
    from haaqi_jax.train.checkpoint import TrainCheckpointManager

    root, overrides = tiny
    work = root / "resumed"
    first = loop.train_and_evaluate(_config(overrides + ["train.stop_after_steps=5"]), work)
    assert first.interrupted and first.final_step == 5 and first.report_dir is None
    assert ("stopped at step 5 (train.stop_after_steps), without a report; run again without "
            "it to resume from the checkpoint at step 4") in capsys.readouterr().err
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(TINY), "--workdir", str(work),
           "--compilation-cache", str(root / "jax_cache")]
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    for o in overrides + ["train.write_report=false"]:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ckpt = TrainCheckpointManager(work / "checkpoints")
    assert ckpt.latest_step() == 8
    resumed, meta = ckpt.restore(8, straight_run.state)
    ckpt.close()
    a, b = _flat(straight_run.state), _flat(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert meta["data_state"]["epoch"] == 2 and meta["data_state"]["step"] == 0
    assert ((work / "metrics.jsonl").read_text()
            == (straight_run.workdir / "metrics.jsonl").read_text())
    # train.py's persistent compilation cache kept the fresh process's train step (a rerun or
    # the next run of a sweep loads it instead of compiling)
    assert any(p.name.startswith("jit_train_step") for p in (root / "jax_cache").iterdir())


def test_a_busy_workdir_stops_every_process_of_a_multi_host_run(tiny, tmp_path):
    """Only process 0 takes the workdir lock; when it is refused, the other processes are
    told and stop too (they used to go on and wait for process 0 at the first collective)."""
    from haaqi_jax.files import exclusive_lock
    from processes import run_train_processes

    _, overrides = tiny
    work = tmp_path / "busy"
    with exclusive_lock(work / loop.LOCK_FILE, "held by this test"):
        codes, outputs = run_train_processes(TINY, work, overrides, tmp_path / "jax_cache",
                                             check=False, timeout=240)
    assert codes == [2, 2], outputs
    assert all(f"another run is writing {work}" in out for out in outputs)


def test_two_processes_train_as_one(straight_run, tiny):
    """Multi-host training (`train.py --coordinator`), simulated by two processes of one CPU
    device each: the feature cache built once by process 0 in a shared folder while process 1
    waits, each process feeding its half of every global batch, a collective checkpoint, a
    crash after step 5 and a resume, and one report written by process 0. The losses, the
    parameters and the report's predictions equal the one-process run's up to the order of
    the gradient sums."""
    import csv

    from haaqi_jax.train.checkpoint import TrainCheckpointManager
    from processes import run_train_processes

    root, overrides = tiny
    work = root / "two_processes"
    shared = [o for o in overrides if not o.startswith("data.cache_dir=")]
    shared.append(f"data.cache_dir={root / 'shared_cache'}")
    _, first = run_train_processes(TINY, work, shared + ["train.stop_after_steps=5"],
                                   root / "jax_cache_2p")
    assert not (work / "report").exists(), first[0][-2000:]
    _, outputs = run_train_processes(TINY, work, shared, root / "jax_cache_2p")
    assert "report in" in outputs[0] and "report in" not in outputs[1]

    runs = [[json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
            for w in (straight_run.workdir, work)]
    assert [(r["kind"], r["step"]) for r in runs[0]] == [(r["kind"], r["step"]) for r in runs[1]]
    np.testing.assert_allclose([r["loss"] for r in runs[1]], [r["loss"] for r in runs[0]],
                               rtol=1e-5)
    ckpt = TrainCheckpointManager(work / "checkpoints")
    state, _ = ckpt.restore(8, straight_run.state)
    ckpt.close()
    a, b = _flat(straight_run.state), _flat(state)
    for k in a:  # atol: the attention's key bias has zero gradient; Adam scales its rounding
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=2e-5, err_msg=k)
    preds = [{row["id"]: float(row["prediction"]) for row in
              csv.DictReader((w / "report" / "predictions.csv").open())}
             for w in (straight_run.workdir, work)]
    assert preds[0].keys() == preds[1].keys()
    np.testing.assert_allclose([preds[1][k] for k in preds[0]], list(preds[0].values()),
                               atol=1e-5)


def test_a_failing_process_ends_the_job_at_once(tmp_path):
    """Process 0 cannot build the demo data (its folder is under a file) while process 1
    waits for it: process 0 names the error and leaves without JAX's shutdown barrier (which
    waits 5 minutes for the others), and its exit stops process 1 within seconds."""
    from processes import run_train_processes

    (tmp_path / "a_file").write_text("")
    codes, outputs = run_train_processes(
        TINY, tmp_path / "run", [f"data.demo_dir={tmp_path / 'a_file' / 'demo'}"],
        tmp_path / "jax_cache", timeout=90, check=False)
    assert codes[0] == 2 and codes[1] != 0
    assert "train.py: error: " in outputs[0] and "a_file/demo" in outputs[0]


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "127.0.0.1:1"], "--coordinator, --num-processes and --process-id go "
                                       "together"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id 2 is not in 0..1"),
])
def test_train_py_checks_its_multi_host_arguments(argv, message, capsys):
    """Checked before jax.distributed would wait minutes for processes that never come."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_train_script", REPO / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    with pytest.raises(SystemExit) as exit_info:
        train_script.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_train_py_out_of_memory_names_its_own_options(tmp_path, monkeypatch, capsys):
    """Out of memory: one line whose advice is train.py's own setting (it told users to pass
    --batch-size, which train.py does not have)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_train_script", REPO / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 30789914120 bytes.\n"
                           "further lines")

    monkeypatch.setattr(loop, "train_and_evaluate", out_of_memory)
    monkeypatch.delenv("HAAQI_JAX_TRACEBACK", raising=False)
    code = train_script.main(["--config", str(TINY), "--workdir", str(tmp_path / "w"),
                              "--compilation-cache", "none"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("train.py: error: out of memory (RESOURCE_EXHAUSTED: Out of memory "
                          "allocating 30789914120 bytes.)")
    assert "--set train.batch_size=" in err and "--batch-size" not in err


def test_frozen_encoder_has_no_optimizer_state_and_stays_put(tiny, tmp_path):
    """End-to-end training on waveforms (data.cache=False): a frozen encoder gets no Adam
    moments and is bit-for-bit unchanged after a step; unfrozen, it gets moments and moves."""
    from haaqi_jax.train import state as state_lib

    _, overrides = tiny
    initial = _flat(loop.build_model(_config(overrides)).params)  # same seed: the runs' start
    for freeze in (True, False):
        cfg = _config(overrides + ["data.cache=false", "train.stop_after_steps=1",
                                   f"model.freeze_encoder={freeze}"])
        result = loop.train_and_evaluate(cfg, tmp_path / f"freeze_{freeze}")
        assert result.final_step == 1
        params = result.state.params
        labels = state_lib.param_labels(params, loop.frozen_patterns(cfg))
        n_trainable = state_lib.count_params(params, labels)
        n_encoder = state_lib.count_params(params["encoder"])
        assert n_trainable == state_lib.count_params(params) - (n_encoder if freeze else 0)
        opt_scalars = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(result.state.opt_state))
        # Adam mu and nu for trainable leaves, plus two step counters (Adam, lr schedule).
        assert opt_scalars == 2 * n_trainable + 2
        after = _flat(params)
        assert after.keys() == initial.keys()
        enc = [k for k in initial if k.startswith("['encoder']")]
        head = [k for k in initial if k.startswith("['head']")]
        assert any(not np.array_equal(initial[k], after[k]) for k in head)
        enc_moved = [k for k in enc if not np.array_equal(initial[k], after[k])]
        if freeze:
            assert enc_moved == []
        else:
            assert len(enc_moved) > len(enc) // 2


def test_loss_falls_on_a_small_synthetic_task():
    """The head learns a label that is a function of its features (same step code path)."""
    from ml_collections import ConfigDict
    from haaqi_jax import losses
    from haaqi_jax.head import HAAQINetHead, HeadConfig
    from haaqi_jax.train import sharding, state as state_lib, steps

    rng = np.random.default_rng(0)
    b, t, c = 16, 10, 8
    feats = rng.normal(size=(b, t, c)).astype(np.float32)
    lengths = rng.integers(4, t + 1, b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    label = 1 / (1 + np.exp(-2 * feats[..., 0].sum(1) / lengths))
    batch = {"features": feats, "token_mask": mask, "audiogram": np.zeros((b, 8), np.float32),
             "label": label.astype(np.float32), "weight": np.ones(b, np.float32)}
    head = HAAQINetHead(HeadConfig(adapter_dim=16, lstm_hidden=16, dense_dim=16, num_heads=4,
                                   dropout_rate=0.0))
    params = {"head": head.init(jax.random.PRNGKey(0), feats, mask, batch["audiogram"])["params"]}
    labels = state_lib.param_labels(params)
    tx = state_lib.make_optimizer(ConfigDict({"name": "adam", "learning_rate": 1e-2}), labels, 80)
    mesh = sharding.make_mesh()
    forward = steps.make_head_forward(head)
    loss_fn = losses.get_loss("haaqi_mse")
    train_step, eval_step = steps.jit_steps(steps.make_train_step(forward, loss_fn, tx, labels),
                                            steps.make_eval_step(forward, loss_fn), mesh)
    st = sharding.replicate(state_lib.create_train_state(params, tx, 0), mesh)
    sharded = sharding.shard_batch(batch, mesh)
    first = float(eval_step(st.params, sharded)["loss_sum"]) / b
    for _ in range(80):
        st, _ = train_step(st, sharded)
    last = float(eval_step(st.params, sharded)["loss_sum"]) / b
    assert last < 0.2 * first, (first, last)


def test_unlabelled_row_is_a_clear_error(tmp_path, tiny):
    _, overrides = tiny
    manifest = write_tiny_dataset(tmp_path / "data", unlabelled_row=2)
    cfg = _config(overrides + [f"data.manifest={manifest}"])
    with pytest.raises(ValueError, match=r"manifest.jsonl:3 \(id 'clip002'\).*haaqi_score"):
        loop.train_and_evaluate(cfg, tmp_path / "work")


def test_components_readout_trains_and_needs_component_labels(tiny, tmp_path):
    """model.head.readout=haaqi_components with loss haaqi_components: one short run reports
    finite scores; a manifest without the parts is refused, naming a row."""
    _, overrides = tiny
    parts = ["model.head.readout=haaqi_components", "loss.name=haaqi_components",
             "train.num_epochs=1", f"data.cache_dir={tmp_path / 'cache'}"]
    with_parts = write_tiny_dataset(tmp_path / "parts", components=True)
    result = loop.train_and_evaluate(_config(overrides + parts + [f"data.manifest={with_parts}"]),
                                     tmp_path / "work")
    metrics = json.loads((result.report_dir / "metrics.json").read_text())
    assert np.isfinite(metrics["by_split"]["valid"]["prediction_mean"])
    params = result.state.params["head"]
    assert params["frame_score"]["kernel"].shape[-1] == 2
    without = write_tiny_dataset(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"id 'clip\d+'.*'haaqi_components'"):
        loop.train_and_evaluate(_config(overrides + parts + [f"data.manifest={without}"]),
                                tmp_path / "work2")


def test_held_out_distortion_and_a_weightless_encoder(tiny, tmp_path):
    """data.hold_out: train and valid rows of the held stage train nothing and are scored as
    the split "held_out"; with position_dim 0 the fbank_patches encoder has no weights at all."""
    root, overrides = tiny
    cfg = _config(overrides + ['data.hold_out=("noise",)', "train.num_epochs=1",
                               "model.encoder_config.position_dim=0",
                               f"data.cache_dir={tmp_path / 'cache'}"])
    rows = [json.loads(l) for l in Path(cfg.data.manifest).read_text().splitlines()]
    held = [r["id"] for r in rows if r["split"] in ("train", "valid") and r["distortion"] == "noise"]
    n_train = sum(r["split"] == "train" and r["distortion"] != "noise" for r in rows)
    result = loop.train_and_evaluate(cfg, tmp_path / "work")
    assert result.final_step == n_train // 2           # batch 2, one epoch of clipping rows
    metrics = json.loads((result.report_dir / "metrics.json").read_text())
    assert metrics["by_split"]["held_out"]["n"] == len(held) > 0
    import csv
    scored = {row["id"] for row in csv.DictReader((result.report_dir / "predictions.csv").open())
              if row["split"] == "held_out"}
    assert scored == set(held)
    with pytest.raises(ValueError, match=r"data.hold_out: hold-out stage\(s\) \['nois'\]"):
        loop.load_splits(_config(overrides + ['data.hold_out=("nois",)']))


def test_batch_must_divide_and_frozen_patterns(tiny):
    from haaqi_jax.train import state as state_lib
    params = {"encoder": {"a": jnp.ones(3)}, "head": {"blstm": {"k": jnp.ones(2)},
                                                     "dense": {"k": jnp.ones(4)}}}
    labels = state_lib.param_labels(params, ("encoder/.*", "head/blstm/.*"))
    assert labels == {"encoder": {"a": "frozen"}, "head": {"blstm": {"k": "frozen"},
                                                           "dense": {"k": "trainable"}}}
    _, overrides = tiny
    with pytest.raises(ValueError, match=r"optimizer.name: unknown optimizer 'adamm'"):
        state_lib.make_optimizer(_config(overrides + ["optimizer.name=adamm"]).optimizer,
                                 labels, 1)


def test_checkpoint_manager_keeps_best_and_latest(tmp_path):
    from haaqi_jax.train.checkpoint import TrainCheckpointManager

    state = {"w": jnp.arange(3.0), "step": jnp.int32(0)}
    mgr = TrainCheckpointManager(tmp_path / "ckpt")
    for step, valid_loss in [(1, 0.5), (2, None), (3, 0.2), (4, None), (5, 0.4), (6, None)]:
        mgr.save(step, {"w": state["w"] + step, "step": jnp.int32(step)}, {"at": step},
                 metrics=None if valid_loss is None else {"valid_loss": valid_loss})
    assert mgr.all_steps() == [3, 6]  # the best (lowest valid loss) and the latest
    mgr.close()
    again = TrainCheckpointManager(tmp_path / "ckpt")  # a fresh process sees the same
    assert again.latest_step() == 6
    restored, meta = again.restore(3, state)
    np.testing.assert_array_equal(restored["w"], np.arange(3.0) + 3)
    assert meta == {"at": 3} and int(restored["step"]) == 3
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 4"):
        again.restore(4, state)
    # A resumed process still knows step 3 is the best (orbax's policy forgot the metrics on a
    # restart and deleted it: the run then failed at its end, "no checkpoint for step 3").
    for step, valid_loss in [(7, 0.3), (8, None)]:
        again.save(step, state, {"at": step},
                   metrics=None if valid_loss is None else {"valid_loss": valid_loss})
    assert again.all_steps() == [3, 8] and again.best_step() == 3
    # The caller's best wins (train.min_delta can keep an earlier step best).
    again.save(9, state, {"at": 9}, metrics={"valid_loss": 0.1}, keep=(3,))
    assert again.all_steps() == [3, 9]


def _respelt_splits(tmp_path, renames):
    """The tiny dataset with its splits renamed ({old: new}; None drops the key)."""
    manifest = write_tiny_dataset(tmp_path / "data")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        if row["split"] in renames:
            new = renames[row["split"]]
            if new is None:
                del row["split"]
            else:
                row["split"] = new
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, rows


def test_own_split_names_are_scored_noted_and_rescorable(tiny, tmp_path, capsys):
    """A validation split named "dev" is scored in the report (not a crash after training);
    a split the run does not use is noted; data.eval_splits may change on a rerun, which
    says it resumes and rescores."""
    _, overrides = tiny
    manifest, _ = _respelt_splits(tmp_path, {"valid": "dev", "test_seen": "test"})
    base = overrides + [f"data.manifest={manifest}", "data.valid_split=dev",
                        "train.num_epochs=1", f"data.cache_dir={tmp_path / 'cache'}"]
    result = loop.train_and_evaluate(_config(base), tmp_path / "work")
    metrics = json.loads((result.report_dir / "metrics.json").read_text())
    assert set(metrics["by_split"]) == {"dev", "test_unseen"}
    err = capsys.readouterr().err
    assert "split(s) {'test': 2} are neither trained on nor scored" in err
    # A hint that pastes into a shell as it is, without the eval splits that have no rows.
    assert '--set "data.eval_splits=(\'test_unseen\', \'test\')"' in err
    assert "no rows in data.eval_splits ['valid', 'test_seen']" in err
    again = loop.train_and_evaluate(
        _config(base + ['data.eval_splits=("dev", "test", "test_unseen")']), tmp_path / "work")
    assert again.final_step == result.final_step
    metrics = json.loads((again.report_dir / "metrics.json").read_text())
    assert set(metrics["by_split"]) == {"dev", "test", "test_unseen"}
    assert f"resuming {tmp_path / 'work'} from its checkpoint at step" in capsys.readouterr().err


@pytest.mark.parametrize("renames, hint", [
    ({"valid": "dev"}, r"if one of \['dev', .*\] is the validation split, name it with --set "
                       r"data.valid_split=NAME"),
    ({"valid": "train", "test_seen": "train", "test_unseen": "train"},
     r"give some rows \"split\": \"valid\", or leave \"split\" out .*data.valid_fraction")])
def test_missing_validation_split_says_what_to_do(tiny, tmp_path, renames, hint):
    _, overrides = tiny
    manifest, _ = _respelt_splits(tmp_path, renames)
    with pytest.raises(ValueError, match=r"split 'valid' has no rows .*" + hint):
        loop.load_splits(_config(overrides + [f"data.manifest={manifest}"]))


def test_relabelled_manifest_is_refused_on_resume(tiny, tmp_path):
    """Labels changed in place (or rows dropped) after a run checkpointed: resuming it is refused,
    naming the changed split, instead of going on with the new labels."""
    _, overrides = tiny
    manifest, rows = _respelt_splits(tmp_path, {})
    base = overrides + [f"data.manifest={manifest}", f"data.cache_dir={tmp_path / 'cache'}"]
    loop.train_and_evaluate(_config(base + ["train.stop_after_steps=3"]), tmp_path / "work")
    for row in rows:
        if row["split"] == "train":
            row["haaqi_score"] = 1 - row["haaqi_score"]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"trained on other data: the train split \(8 rows -> "
                                         r"8 rows, other files, audiograms or labels\) of .*"
                                         r"manifest.jsonl changed since"):
        loop.train_and_evaluate(_config(base), tmp_path / "work")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))  # one test row less
    loop.train_and_evaluate(_config(base + ["train.stop_after_steps=3"]), tmp_path / "fresh")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"] != "clip008"))
    with pytest.raises(ValueError, match=r"the valid split \(4 rows -> 3 rows\)"):
        loop.train_and_evaluate(_config(base), tmp_path / "fresh")


@pytest.mark.parametrize("override, message", [
    ("report.color_by=distortionn",
     r"report.color_by must be one of \('split', 'distortion', 'hearing_loss'\), got "
     r"'distortionn'"),
    ("train.num_epochs=-1", r"train.num_epochs must be a whole number >= 0, got -1"),
    ("train.batch_size=0", r"train.batch_size must be a whole number >= 1, got 0"),
    ("data.demo_seconds=(1.0, 2.0, 3.0)", r"data.demo_seconds must be \(shortest, longest\)"),
    ("data.demo_seconds=(3.0, 2.0)", r"0 < shortest <= longest, got \(3.0, 2.0\)"),
    # these failed only after the data was built and labelled, or with a TypeError traceback
    # (None for a count is now refused by --set itself; a config file's None is checked below)
    ("train.batch_size=None", r"train.batch_size='None': train.batch_size is not optional"),
    ("optimizer.learning_rate=None", r"optimizer.learning_rate='None': .* is not optional"),
    ("optimizer.learning_rate=-1", r"optimizer.learning_rate must be a number > 0, got -1"),
    ("train.min_delta=None", r"train.min_delta='None': train.min_delta is not optional"),
    ("optimizer.name=adma", r"optimizer.name: unknown optimizer 'adma'"),
    ("data.cache_dtype=float64", r"data.cache_dtype must be one of \('float16', 'float32'\)"),
    ("loss.name=haaqi_mes", r"loss.name='haaqi_mes': unknown loss 'haaqi_mes'"),
    ("loss.kwargs.clip_wieght=2.0", r"loss.name='haaqi_mse': loss 'haaqi_mse' takes no keyword "
                                    r"'clip_wieght'"),
    ("loss.name=distill_uncertainty", r"loss.name='distill_uncertainty' has learnable "
                                      r"parameters.*only a distillation trains"),
    # values of the right type out of range: these trained (a dropout of 1.5 in the head, a
    # valid fraction of 2) or failed only after the data was built
    ("model.head.dropout_rate=1.5", r"model.head: HeadConfig: dropout_rate must be a number "
                                    r"in \[0, 1\), got 1.5"),
    ("model.head.lstm_dropout_rate=-0.1", r"lstm_dropout_rate must be a number in \[0, 1\), "
                                          r"got -0.1"),
    ("optimizer.b1=5", r"optimizer.b1 must be a number in \[0, 1\), got 5.0"),
    ("optimizer.b2=-0.5", r"optimizer.b2 must be a number in \[0, 1\), got -0.5"),
    ("optimizer.warmup_steps=-5", r"optimizer.warmup_steps must be a whole number >= 0, got -5"),
    ("data.valid_fraction=2", r"data.valid_fraction must be a number in \[0, 1\), got 2.0"),
    ("data.crop_seconds=-1", r"data.crop_seconds must be None or seconds > 0, got -1.0"),
    ("report.num_example_predictions=-1", r"report.num_example_predictions must be a whole "
                                          r"number >= 0, got -1"),
    ("train.monitor=lccc", r"train.monitor must be 'loss' or a registered metric \('lcc', "
                           r"'mse', 'srcc'; .*\), got 'lccc'"),
    # a negative seed failed in numpy naming no key ("expected non-negative integer"), the demo
    # seed without its section; a demo label batch of 0 was taken for the default 8
    ("seed=-1", r"^seed must be a whole number >= 0, got -1"),
    ("data.demo_seed=-1", r"data.demo_seed must be a whole number >= 0, got -1"),
    ("data.demo_label_batch=0", r"data.demo_label_batch must be a whole number >= 1, got 0")])
def test_run_settings_are_checked_before_training(tiny, tmp_path, override, message):
    """Before, a negative epoch count trained nothing and exited 0, a zero batch failed naming
    an internal class, and a third demo length was dropped; a loss typo or a cache dtype
    failed only after the data was built (minutes of labelling at the default size), None
    for a count with a traceback, and a negative learning rate trained."""
    _, overrides = tiny
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(_config(overrides + [override]), tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_a_batch_that_does_not_divide_over_the_devices_leaves_no_folder(tiny, tmp_path,
                                                                       monkeypatch):
    """(config.json used to be written first, then the batch refused.)"""
    from types import SimpleNamespace
    from haaqi_jax.train import sharding
    _, overrides = tiny
    monkeypatch.setattr(sharding, "make_mesh", lambda *a, **k: SimpleNamespace(
        devices=np.empty(3)))
    with pytest.raises(ValueError, match=r"train.batch_size \d+ does not divide by the number "
                                         r"of devices 3"):
        loop.train_and_evaluate(_config(overrides), tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_train_py_reports_bad_data_in_one_line(tmp_path):
    """train.py's boundary: a missing manifest is one line naming it, exit code 2."""
    missing = tmp_path / "nowhere.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("HAAQI_JAX_TRACEBACK", None)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(TINY),
                           "--set", f"data.manifest={missing}", "--workdir", str(tmp_path / "w"),
                           "--compilation-cache", "none"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"train.py: error: manifest {missing} does not exist")
    # A bad --set is one line too (it printed argparse's usage block first), and the default
    # config is found from another folder.
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--set", "train.nope=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("train.py: error:") and "train.nope" in proc.stderr
    # a --workdir that is a file ("[Errno 17] File exists" before, naming no option)
    (tmp_path / "afile").write_text("x")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(TINY),
                           "--workdir", str(tmp_path / "afile"), "--compilation-cache", "none"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        f"train.py: error: --workdir {tmp_path / 'afile'} is a file; give a folder")


def test_a_clip_on_both_sides_of_a_random_split_is_noted(tiny, tmp_path, capsys):
    """Rows of one file for several listeners, no split and no group (the authors' train.json):
    the random split may put the clip in train and valid; the run says so."""
    _, overrides = tiny
    manifest, rows = _respelt_splits(tmp_path, {"train": None, "valid": None})
    for i, row in enumerate(rows):                      # every clip twice, two listeners
        row["file_path"] = rows[i - i % 2]["file_path"]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loop.load_splits(_config(overrides + [f"data.manifest={manifest}"]))
    assert "have rows in both train and valid" in capsys.readouterr().err
    for row in rows:
        row["group"] = row["file_path"]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = loop.load_splits(_config(overrides + [f"data.manifest={manifest}"]))
    assert "both train and valid" not in capsys.readouterr().err
    assert not ({r.file_path for r in splits["train"]} & {r.file_path for r in splits["valid"]})


def test_a_random_split_can_be_rescored_from_the_report(tiny, tmp_path):
    """Rows without a split are divided at random; report/manifest.jsonl records where each
    went, so `haaqi-jax evaluate` on it reproduces the report's validation scores."""
    import csv
    from haaqi_jax import cli

    _, overrides = tiny
    manifest, rows = _respelt_splits(tmp_path, {"train": None, "valid": None})
    result = loop.train_and_evaluate(_config(overrides + [
        f"data.manifest={manifest}", "train.num_epochs=1",
        f"data.cache_dir={tmp_path / 'cache'}"]), tmp_path / "work")
    written = [json.loads(l) for l in (result.report_dir / "manifest.jsonl").read_text()
               .splitlines()]
    umask = os.umask(0)
    os.umask(umask)                     # readable as the report's other files (not 0600)
    assert (result.report_dir / "manifest.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(r["id"] for r in written) == sorted(str(r["id"]) for r in rows)
    predicted = {r["id"]: r for r in csv.DictReader(
        (result.report_dir / "predictions.csv").open())}
    valid = {r["id"] for r in written if r["split"] == "valid"}
    assert valid == {i for i, r in predicted.items() if r["split"] == "valid"} != set()
    assert cli.main(["evaluate", "--model", str(result.report_dir / "best_model"), "--manifest",
                     str(result.report_dir / "manifest.jsonl"), "--out", str(tmp_path / "eval"),
                     "--splits", "valid", "--no-progress"]) == 0
    again = {r["id"]: float(r["prediction"]) for r in csv.DictReader(
        (tmp_path / "eval" / "predictions.csv").open())}
    assert set(again) == valid
    for i in valid:
        assert again[i] == pytest.approx(float(predicted[i]["prediction"]), abs=1e-5)


def test_head_checkpoint_starts_the_head_from_a_haaqinet(tiny, tmp_path, capsys):
    """model.head_checkpoint (fine-tuning a released or trained HAAQI-Net): the head's weights
    come from it; a head of other settings is refused naming them."""
    from haaqi_jax.model import HAAQINet

    _, overrides = tiny
    source = loop.build_model(_config(overrides + ["seed=5"]))
    source.save(tmp_path / "source")
    net = loop.build_model(_config(overrides + [f"model.head_checkpoint={tmp_path / 'source'}"]))
    assert "head: initialised from" in capsys.readouterr().err
    for a, b in zip(jax.tree_util.tree_leaves(net.params["head"]),
                    jax.tree_util.tree_leaves(source.params["head"])):
        np.testing.assert_array_equal(a, b)
    fresh = loop.build_model(_config(overrides))
    assert not np.array_equal(fresh.params["head"]["adapter"]["kernel"],
                              net.params["head"]["adapter"]["kernel"])
    with pytest.raises(ValueError, match=r"its head differs from model.head in audiogram_scale "
                                         r"\(0.01 there, 0.5 here\)"):
        loop.build_model(_config(overrides + [f"model.head_checkpoint={tmp_path / 'source'}",
                                              "model.head.audiogram_scale=0.5"]))
    # Several settings differ: each is named, and the hint sets them all.
    with pytest.raises(ValueError, match=r"--set model.head.audiogram_scale=0.01 "
                                         r"--set model.head.num_heads=4$"):
        loop.build_model(_config(overrides + [f"model.head_checkpoint={tmp_path / 'source'}",
                                              "model.head.audiogram_scale=0.5",
                                              "model.head.num_heads=8"]))
    with pytest.raises(FileNotFoundError, match="model.head_checkpoint: .*missing"):
        loop.build_model(_config(overrides + [f"model.head_checkpoint={tmp_path}"]))
    # The same head settings on an encoder of other features: the encoder is named.
    with pytest.raises(ValueError, match=r"its head reads \d+-wide encoder features, this "
                                         r"run's encoder gives \d+.*clip_statistics\": true"):
        loop.build_model(_config(overrides + [f"model.head_checkpoint={tmp_path / 'source'}",
                                              "model.encoder_config.clip_statistics=False"]))
    assert isinstance(net, HAAQINet)

    # A folder saved before the stacked-BLSTM settings existed has their defaults.
    meta = json.loads((tmp_path / "source" / "config.json").read_text())
    for key in ("lstm_layers", "lstm_dropout_rate"):
        del meta["config"]["head"][key]
    (tmp_path / "source" / "config.json").write_text(json.dumps(meta))
    loop.build_model(_config(overrides + [f"model.head_checkpoint={tmp_path / 'source'}"]))
    # A stacked head (as the authors' trainer config) needs the same stack here.
    loop.build_model(_config(overrides + ["model.head.lstm_layers=2"])).save(tmp_path / "deep")
    with pytest.raises(ValueError, match=r"lstm_layers \(2 there, 1 here\); to match it: --set "
                                         r"model.head.lstm_layers=2"):
        loop.build_model(_config(overrides + [f"model.head_checkpoint={tmp_path / 'deep'}"]))
    deep = loop.build_model(_config(overrides + [f"model.head_checkpoint={tmp_path / 'deep'}",
                                                 "model.head.lstm_layers=2",
                                                 "model.head.lstm_dropout_rate=0.5"]))
    assert "forward_1" in deep.params["head"]["blstm"]


def test_resume_is_refused_when_the_starting_weights_changed(tiny, tmp_path):
    """The same model.head_checkpoint path holding other weights (converted anew): the resume
    says so (it used to blame an iterator digest, or went on)."""
    _, overrides = tiny
    loop.build_model(_config(overrides + ["seed=5"])).save(tmp_path / "source")
    sets = overrides + [f"model.head_checkpoint={tmp_path / 'source'}", "train.num_epochs=1",
                        "train.stop_after_steps=2", f"data.cache_dir={tmp_path / 'cache'}"]
    loop.train_and_evaluate(_config(sets), tmp_path / "work")
    loop.build_model(_config(overrides + ["seed=6"])).save(tmp_path / "source", overwrite=True)
    with pytest.raises(ValueError, match=r"holds a run that started from other weights: the "
                                         r"files behind model.head_checkpoint changed"):
        loop.train_and_evaluate(_config(sets), tmp_path / "work")


def test_a_nan_loss_stops_training_naming_the_term(tiny, tmp_path):
    """Never a silent NaN: a loss that turns NaN stops the run at the next log, naming the
    non-finite terms, with no checkpoint of a NaN state."""
    from haaqi_jax.losses import register_loss

    @register_loss("test_nan_loss", overwrite=True)
    def nan_loss(predictions, batch, **_):
        value = jnp.mean(predictions["clip_score"]) * jnp.nan
        return value, {"nan_term": value}

    _, overrides = tiny
    with pytest.raises(ValueError, match=r"train steps 1-1: the loss is nan \(not finite: "
                                         r"grad_norm, loss, nan_term, param_norm\).*No checkpoint "
                                         r"was kept"):
        loop.train_and_evaluate(_config(overrides + ["loss.name=test_nan_loss",
                                                     f"data.cache_dir={tmp_path / 'cache'}"]),
                                tmp_path / "work")


def test_a_nan_gradient_under_a_finite_loss_keeps_no_nan_checkpoint(tiny, tmp_path):
    """A loss whose value is finite but whose gradient is NaN (sqrt at 0) turns the parameters
    NaN in the first step. The run must stop there, naming grad_norm, before it checkpoints
    that state: it used to save step 1 and then call it "the last finite checkpoint"."""
    from haaqi_jax.losses import register_loss

    @register_loss("test_nan_gradient", overwrite=True)
    def nan_gradient(predictions, batch, **_):
        score = predictions["clip_score"]
        value = jnp.mean((score - batch["label"]) ** 2) \
            + 0.0 * jnp.sqrt(jnp.abs(score[0] - score[0]))
        return value, {}

    assert np.isnan(jax.grad(lambda x: jnp.sqrt(jnp.abs(x - x)))(0.5))   # the premise
    _, overrides = tiny
    with pytest.raises(ValueError, match=r"train steps 1-1: .*not finite: grad_norm.*No "
                                         r"checkpoint was kept"):
        loop.train_and_evaluate(_config(overrides + ["loss.name=test_nan_gradient",
                                                     "train.checkpoint_every_steps=1",
                                                     f"data.cache_dir={tmp_path / 'cache'}"]),
                                tmp_path / "work")
    assert not [p for p in (tmp_path / "work" / "checkpoints").iterdir() if p.name.isdigit()]


def test_parameters_that_overflow_are_never_checkpointed(tiny, tmp_path):
    """Plain SGD at a learning rate near float32's largest value on a heavily weighted loss:
    the first update overflows the parameters to inf, while that step's loss and gradient
    norm (both of the parameters *before* the update) are finite. The run must stop before
    it checkpoints infinite parameters, naming param_norm; it used to save them and then call
    that step "the last finite checkpoint"."""
    import orbax.checkpoint as ocp

    _, overrides = tiny
    with pytest.raises(ValueError, match=r"train steps 1-1: .*not finite: [^)]*param_norm.*No "
                                         r"checkpoint was kept"):
        loop.train_and_evaluate(_config(overrides + ["optimizer.name=sgd",
                                                     "optimizer.learning_rate=3e38",
                                                     "loss.kwargs.frame_weight=1e6",
                                                     "optimizer.warmup_steps=0",
                                                     "train.checkpoint_every_steps=1",
                                                     "train.log_every_steps=1",
                                                     f"data.cache_dir={tmp_path / 'cache'}"]),
                                tmp_path / "work")
    for step_dir in (tmp_path / "work" / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            saved = ocp.StandardCheckpointer().restore((step_dir / "state").absolute())
            for leaf in jax.tree_util.tree_leaves(saved["params"]):
                assert np.isfinite(np.asarray(leaf)).all(), step_dir.name


def test_param_norm_is_logged_after_the_update():
    """param_norm: the global norm of the trainable parameters the step returns (after its
    update), what a reader of metrics.jsonl watches for blow-ups."""
    from haaqi_jax.train import state as state_lib
    from haaqi_jax.train import steps as steps_lib
    import optax

    params = {"w": jnp.array([3.0, 4.0]), "frozen": jnp.array([100.0])}
    labels = {"w": steps_lib.TRAINABLE, "frozen": steps_lib.FROZEN}
    tx = optax.sgd(0.5)
    state = state_lib.TrainState(step=jnp.array(0), params=params, opt_state=tx.init(params),
                                 rng=jax.random.PRNGKey(0))
    forward = lambda p, batch, **_: {"clip_score": jnp.sum(p["w"] * batch["x"], axis=-1)}
    loss = lambda pred, batch: (jnp.mean(pred["clip_score"]), {})
    step = steps_lib.make_train_step(forward, loss, tx, labels)
    new_state, metrics = step(state, {"x": jnp.ones((1, 2)), "weight": jnp.ones(1)})
    expected = np.linalg.norm(np.array([3.0, 4.0]) - 0.5)      # the gradient is all ones
    assert float(metrics["param_norm"]) == pytest.approx(expected, rel=1e-6)
    assert np.asarray(new_state.params["frozen"]) == 100.0


def test_a_run_that_predicts_one_constant_says_so(tiny, tmp_path, capsys):
    """A learning rate far too large saturates the head's sigmoid: every validation clip gets
    the same score, the correlations are undefined and the gradient is zero, yet nothing is
    NaN. The run must say so on stderr, once, rather than finish quietly with a "best" model
    that scores every clip alike."""
    _, overrides = tiny
    result = loop.train_and_evaluate(_config(overrides + ["optimizer.learning_rate=1e4",
                                                          "train.num_epochs=3",
                                                          f"data.cache_dir={tmp_path / 'c'}"]),
                                     tmp_path / "work")
    valid = [json.loads(line) for line in (tmp_path / "work" / loop.METRICS_FILE).open()
             if '"valid"' in line]
    assert valid and all(r["lcc"] is None for r in valid[1:])         # the premise
    err = capsys.readouterr().err
    assert err.count("validation predictions are all") == 1, err
    assert "optimizer.learning_rate" in err
    assert result is not None


def test_feature_cache_notices_a_changed_encoder_code(tiny, tmp_path, monkeypatch):
    """The same weights and settings but other encoder code (a user's own encoder edited, or a
    library change): the cached features are not reused. They were, keyed by the weights."""
    from haaqi_jax import fbank as fbank_lib

    root, overrides = tiny
    config = _config(overrides + [f"data.cache_dir={tmp_path / 'cache'}"])
    net = loop.build_model(config)
    for name in ("w0", "w1", "w2"):
        (tmp_path / name).mkdir()
    loop.build_train_data(config, net, tmp_path / "w0")
    assert len(list((tmp_path / "cache").iterdir())) == 1
    loop.build_train_data(config, net, tmp_path / "w1")             # unchanged: reused
    assert len(list((tmp_path / "cache").iterdir())) == 1
    original = fbank_lib.normalize_fbank
    monkeypatch.setattr(fbank_lib, "normalize_fbank", lambda x: 0.5 * original(x))
    jax.clear_caches()                  # this process traced the old code; a new one would not
    loop.build_train_data(config, net, tmp_path / "w2")
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_settings_that_would_do_nothing_are_refused(tiny):
    """A weight decay adam ignores, a frozen pattern that matches no parameter (a typo) or is no
    regular expression, and freezing everything: named before anything is built."""
    _, overrides = tiny
    with pytest.raises(ValueError, match="optimizer.weight_decay 0.5 is applied by adamw only"):
        loop.check_run_settings(_config(overrides + ["optimizer.weight_decay=0.5"]))
    loop.check_run_settings(_config(overrides + ["optimizer.weight_decay=0.5",
                                                 "optimizer.name=adamw"]))
    # The same checks on a plain dict (the Python API) name the key too.
    from haaqi_jax.train.state import check_optimizer
    with pytest.raises(ValueError, match="optimizer.weight_decay 0.5 is applied by adamw only"):
        check_optimizer({"learning_rate": 1e-3, "weight_decay": 0.5})
    with pytest.raises(ValueError, match="optimizer.schedule: unknown schedule 'cosin'"):
        check_optimizer({"learning_rate": 1e-3, "schedule": "cosin"})
    for pattern, message in ((r"blstm/.*", r"'blstm/\.\*' matches no parameter"),
                             ("head/[", "is not a regular expression"),
                             ("head/.*", "every parameter is frozen")):
        config = _config(overrides + [f"train.frozen_patterns=({pattern!r},)"])
        with pytest.raises(ValueError, match=message):
            loop.check_frozen(config, loop.build_model(config))
    config = _config(overrides + ["train.frozen_patterns=('head/blstm/.*',)"])
    loop.check_frozen(config, loop.build_model(config))


@pytest.mark.parametrize("losses_, min_delta, patience", [
    ([0.5, 0.4, 0.45, 0.41, 0.39, 0.6, 0.7, 0.8], 0.0, 3),
    ([0.5, 0.4, 0.45, 0.41, 0.39, 0.6, 0.7, 0.8], 0.02, 2),
    ([0.3, 0.3, 0.3, 0.2], 0.0, 0),                      # 0: never stops; ties do not improve
])
def test_early_stopping_against_a_numpy_reference(losses_, min_delta, patience):
    """Best epoch and stopping epoch of a loss sequence, against a plain recomputation: the
    best is the running minimum beaten by more than min_delta; the run stops after
    `patience` epochs in a row that do not beat it."""
    early = {"best_valid_loss": None, "best_step": None, "bad_epochs": 0, "stopped": False}
    steps_per_epoch, stopped_at = 10, None
    for epoch, value in enumerate(losses_, start=1):
        early_stopping.update(early, value, epoch * steps_per_epoch,
                              min_delta=min_delta, patience=patience)
        if early["stopped"]:
            stopped_at = epoch
            break
    best, best_epoch, since, expected_stop = np.inf, None, 0, None
    for epoch, value in enumerate(losses_, start=1):
        if best_epoch is None or value < best - min_delta:
            best, best_epoch, since = value, epoch, 0
        else:
            since += 1
        if patience and since == patience:
            expected_stop = epoch
            break
    assert early["best_step"] == best_epoch * steps_per_epoch
    assert early["best_valid_loss"] == best and stopped_at == expected_stop


NAN = float("nan")


@pytest.mark.parametrize("monitor, values, min_delta, patience, by_hand", [
    # by_hand: (best epoch, stopping epoch or None), worked out on paper
    ("lcc", [0.2, 0.5, 0.45, 0.52, 0.7, 0.69, 0.6, 0.65, 0.8], 0.0, 3, (5, 8)),
    ("lcc", [0.2, 0.5, 0.45, 0.52, 0.7, 0.69, 0.6, 0.65, 0.8], 0.05, 2,   # 0.52: not by 0.05
     (2, 4)),
    ("srcc", [0.3, 0.3, 0.1, 0.3, 0.31], 0.0, 0,          # 0: never stops; ties do not improve
     (5, None)),
    # NaN (constant predictions): the first epoch is the best all the same (best_value None),
    # any finite value beats it whatever min_delta, and no NaN ever beats a finite one.
    ("lcc", [NAN, NAN, -0.2, NAN, -0.25, 0.3, NAN, NAN, NAN], 0.5, 3, (3, 6)),
    ("srcc", [0.4, NAN, NAN, 0.41], 0.0, 0, (4, None)),
    ("mse", [0.3, 0.2, 0.25, 0.19, 0.1, 0.12, 0.11], 0.02, 2, (2, 4)),  # lower is better
    # exactly min_delta better is not better (0.5 - 0.25 is 0.25 in binary too), nor a tie
    ("mse", [0.5, 0.25, 0.5, 0.125], 0.25, 0, (4, None)),
    ("lcc", [0.25, 0.5, 0.25, 0.625], 0.25, 0, (4, None)),
    ("loss", [0.3, 0.3, 0.3, 0.31], 0.0, 3, (1, 4)),
    # undefined in every epoch: the first stays the best, with no value (None, not NaN)
    ("srcc", [NAN, NAN, NAN], 0.0, 2, (1, 3)),
])
def test_early_stopping_on_a_metric_against_a_plain_reference(monitor, values, min_delta,
                                                              patience, by_hand):
    """train.monitor: the best epoch is the running best of the monitored quantity (highest
    LCC / SRCC, least MSE), beaten by more than min_delta in its own units; the run stops
    after `patience` epochs in a row that do not beat it. The valid losses rise throughout
    (following the loss would keep epoch 1); best_valid_loss is the best epoch's loss."""
    early = early_stopping.new_record(monitor)
    steps_per_epoch, stopped_at, flags = 10, None, []
    valid_losses = [1.0 + 0.1 * epoch for epoch in range(len(values))]
    for epoch, (loss, value) in enumerate(zip(valid_losses, values), start=1):
        flags.append(early_stopping.update(early, loss, epoch * steps_per_epoch,
                                           value=value, min_delta=min_delta,
                                           patience=patience))
        if early["stopped"]:
            stopped_at = epoch
            break
    sign = -1 if monitor in ("mse", "loss") else 1
    best, best_epoch, since, expected_stop, expected_flags = None, None, 0, None, []
    for epoch, value in enumerate(values, start=1):
        finite = value == value
        better = best_epoch is None or (finite and (best is None
                                                    or sign * (value - best) > min_delta))
        expected_flags.append(better)
        if better:
            best, best_epoch, since = (value if finite else None), epoch, 0
        else:
            since += 1
        if patience and since == patience:
            expected_stop = epoch
            break
    assert flags == expected_flags and (best_epoch, expected_stop) == by_hand
    assert early["monitor"] == monitor and early["best_step"] == best_epoch * steps_per_epoch
    assert early["best_value"] == best and stopped_at == expected_stop
    assert early["best_valid_loss"] == valid_losses[best_epoch - 1]
    with pytest.raises(ValueError, match="the value of the monitored 'lcc'"):
        early_stopping.update(early_stopping.new_record("lcc"), 0.5, 10, min_delta=0.0,
                              patience=0)


def test_an_early_stopping_record_from_before_train_monitor_resumes_as_loss():
    """A checkpoint written before train.monitor holds no monitor and no best_value: it
    followed the valid loss. Resuming it under another monitor is refused by name."""
    old = {"best_valid_loss": 0.25, "best_step": 8, "bad_epochs": 1, "stopped": False}
    early = early_stopping.resumed_record(old, "loss")
    assert early == {**old, "monitor": "loss", "best_value": 0.25}
    for value in (0.26, 0.24):
        again = dict(old)                            # an old record updated in place works too
        assert early_stopping.update(again, value, 12, min_delta=0.0,
                                     patience=0) == (value < 0.25)
    with pytest.raises(ValueError, match=r"its checkpoints followed train.monitor='loss'.*"
                                         r"train.monitor='lcc'"):
        early_stopping.resumed_record(old, "lcc")
    new = early_stopping.new_record("srcc")
    assert early_stopping.resumed_record(dict(new), "srcc") == new
    with pytest.raises(ValueError, match=r"train.monitor='srcc'.*train.monitor='loss'"):
        early_stopping.resumed_record(new, "loss")


def _valid_rows(workdir):
    return [json.loads(line) for line in (Path(workdir) / loop.METRICS_FILE).open()
            if '"valid"' in line]


def test_a_run_monitoring_srcc_keeps_the_epoch_of_highest_srcc(tiny, tmp_path, capsys):
    """train.monitor=srcc on the tiny run (interrupted and resumed on the way): the best step,
    the "best" flags of metrics.jsonl, the report's training.json and the TrainResult follow
    the validation SRCC, not the loss; a resume with another train.monitor is refused."""
    _, overrides = tiny
    sets = overrides + ["train.num_epochs=5", "train.monitor=srcc", "optimizer.learning_rate=3e-3"]
    first = loop.train_and_evaluate(_config(sets + ["train.stop_after_steps=9"]),
                                    tmp_path / "w")
    assert first.interrupted and first.monitor == "srcc"
    result = loop.train_and_evaluate(_config(sets), tmp_path / "w")
    valid = _valid_rows(tmp_path / "w")
    srcc = [row["srcc"] for row in valid]
    assert len(valid) == 5 and all(v is not None for v in srcc)
    best = valid[int(np.argmax(srcc))]                     # the first of the highest
    # the premise: following the valid loss would keep another epoch
    assert best["step"] != valid[int(np.argmin([row["loss"] for row in valid]))]["step"]
    assert result.best_step == best["step"] and result.monitor == "srcc"
    assert result.best_value == best["srcc"] and result.best_valid_loss == best["loss"]
    running = np.maximum.accumulate(srcc)
    assert [row["best"] for row in valid] == [True] + [
        bool(srcc[i] > running[i - 1]) for i in range(1, len(srcc))]
    summary = json.loads((result.report_dir / "training.json").read_text())
    assert (summary["monitor"], summary["best_value"], summary["best_step"],
            summary["best_valid_loss"]) == ("srcc", best["srcc"], best["step"], best["loss"])
    saved = json.loads((result.report_dir / "best_model" / "config.json").read_text())
    assert (saved["monitor"], saved["best_value"], saved["best_step"]) == (
        "srcc", best["srcc"], best["step"])              # why this step, with the model
    with pytest.raises(ValueError, match=r"train.monitor: 'srcc' -> 'lcc'"):
        loop.train_and_evaluate(_config(sets + ["train.monitor=lcc"]), tmp_path / "w")


def test_a_checkpoint_from_before_train_monitor_resumes_exactly(straight_run, tiny, tmp_path,
                                                                 monkeypatch):
    """A run interrupted before train.monitor existed (its checkpoints' early-stopping record
    and its config.json without it) resumes as the loss-monitored run it was: the same log and
    parameters as the uninterrupted run."""
    _, overrides = tiny
    work = tmp_path / "old"
    new_meta = loop._meta
    monkeypatch.setattr(loop, "_meta", lambda data_state, early: new_meta(data_state, {
        k: v for k, v in early.items() if k not in ("monitor", "best_value")}))
    first = loop.train_and_evaluate(_config(overrides + ["train.stop_after_steps=5"]), work)
    assert first.interrupted
    monkeypatch.setattr(loop, "_meta", new_meta)
    from haaqi_jax.train.checkpoint import TrainCheckpointManager
    ckpt = TrainCheckpointManager(work / loop.CHECKPOINT_DIR)
    _, meta = ckpt.restore(4, first.state)
    ckpt.close()
    assert "monitor" not in meta["early_stopping"]                 # the premise: old format
    saved = json.loads((work / loop.CONFIG_FILE).read_text())
    del saved["train"]["monitor"]
    (work / loop.CONFIG_FILE).write_text(json.dumps(saved))
    result = loop.train_and_evaluate(_config(overrides), work)
    assert result.monitor == "loss" and result.best_step == straight_run.best_step
    assert result.best_value == result.best_valid_loss == straight_run.best_valid_loss
    assert ((work / loop.METRICS_FILE).read_text()
            == (straight_run.workdir / loop.METRICS_FILE).read_text())
    a, b = _flat(straight_run.state), _flat(result.state)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_user_registered_metric_is_monitored_and_logged(tiny, tmp_path, capsys):
    """A metric registered by a module that the config file imports (as a user's loss):
    train.monitor names it, the valid rows log it, the best step is its least value, and
    min_delta is in its units (10: nothing beats the first epoch, patience 1 stops after the
    second); a rerun of the stopped run names it in its message."""
    from haaqi_jax.train import metrics as metrics_lib
    _, overrides = tiny
    (tmp_path / "haaqi_test_user_metric.py").write_text(
        "import numpy as np\n"
        "from haaqi_jax.train.metrics import register_metric\n\n"
        "@register_metric('test_mean_abs_error', higher_is_better=False)\n"
        "def mean_abs_error(pred, true, weight):\n"
        "    return float(np.sum(weight * np.abs(pred - true)) / np.sum(weight))\n\n"
        "@register_metric('test_max_abs_error', higher_is_better=False)\n"
        "def max_abs_error(pred, true, weight):\n"
        "    return float(np.max(np.abs(pred - true)))\n")
    (tmp_path / "my_config.py").write_text(
        "import haaqi_test_user_metric  # registers test_mean_abs_error, test_max_abs_error\n"
        "from haaqi_jax.config import load_config_file\n\n"
        "def get_config():\n"
        f"    c = load_config_file({str(TINY)!r})\n"
        "    c.train.monitor = 'test_mean_abs_error'\n"
        "    c.report.metrics = ('test_max_abs_error',)\n"
        "    return c\n")
    try:
        sets = overrides + ["train.num_epochs=3", "optimizer.schedule=constant"]
        result = loop.train_and_evaluate(cfglib.get_config(tmp_path / "my_config.py", sets),
                                         tmp_path / "w")
        valid = _valid_rows(tmp_path / "w")
        errors = [row["test_mean_abs_error"] for row in valid]
        assert len(valid) == 3 and all(np.isfinite(errors))
        assert errors[0] > 0 and errors != [row["mse"] for row in valid]
        assert result.best_step == valid[int(np.argmin(errors))]["step"]
        assert result.monitor == "test_mean_abs_error" and result.best_value == min(errors)
        summary = json.loads((result.report_dir / "training.json").read_text())
        assert summary["monitor"] == "test_mean_abs_error"
        # The report has the monitored metric without asking, and report.metrics' too.
        report = json.loads((result.report_dir / "metrics.json").read_text())
        rows = list(csv.DictReader((result.report_dir / "predictions.csv").open()))
        p = np.array([float(r["prediction"]) for r in rows])
        t = np.array([float(r["label"]) for r in rows])
        for key, mask in [(None, np.ones(len(rows), bool))] + [
                (split, np.array([r["split"] == split for r in rows]))
                for split in report["by_split"]]:
            entry = report["overall"] if key is None else report["by_split"][key]
            assert entry["test_mean_abs_error"] == pytest.approx(
                np.mean(np.abs(p[mask] - t[mask])), abs=1e-12)
            assert entry["test_max_abs_error"] == pytest.approx(
                np.max(np.abs(p[mask] - t[mask])), abs=1e-12)
        assert ((result.report_dir / "table.csv").read_text().splitlines()[0]
                == "subset,n,lcc,srcc,mse,test_max_abs_error,test_mean_abs_error,label_mean,"
                   "prediction_mean")

        stop = sets + ["train.min_delta=10.0", "train.patience=1", "train.write_report=false"]
        first = loop.train_and_evaluate(cfglib.get_config(tmp_path / "my_config.py", stop),
                                        tmp_path / "s")
        assert first.stopped_early and first.best_step == 4 and first.final_step == 8
        capsys.readouterr()
        loop.train_and_evaluate(cfglib.get_config(tmp_path / "my_config.py", stop),
                                tmp_path / "s")
        assert ("1 epochs without a better validation test_mean_abs_error"
                in capsys.readouterr().err)
    finally:
        metrics_lib.unregister_metric("test_mean_abs_error")
        metrics_lib.unregister_metric("test_max_abs_error")
        sys.modules.pop("haaqi_test_user_metric", None)


def test_report_metrics_must_name_registered_metrics(tiny):
    """report.metrics is checked with the other settings, before any data is built."""
    _, overrides = tiny
    with pytest.raises(ValueError, match=r"report.metrics: 'nope' is not registered "
                                         r"\(registered: 'lcc', 'mse', 'srcc'"):
        loop.check_run_settings(_config(overrides + ["report.metrics=mse,nope"]))
    c = _config(overrides + ["report.metrics=lcc,mse"])
    assert tuple(c.report.metrics) == ("lcc", "mse")
    loop.check_run_settings(c)
    assert tuple(_config(overrides).report.metrics) == ()


def test_a_monitored_metric_undefined_in_every_epoch_is_warned_of_once(tiny, tmp_path,
                                                                         capsys):
    """A registered metric that returns NaN: no epoch can beat the first, which stays the best
    step (best_value None), and patience counts every later epoch. That was silent (a null in
    metrics.jsonl); the run now says so, once."""
    from haaqi_jax.train import metrics as metrics_lib
    _, overrides = tiny
    metrics_lib.register_metric("test_undefined", lambda p, t, w: float("nan"),
                                higher_is_better=True)
    try:
        result = loop.train_and_evaluate(
            _config(overrides + ["train.monitor=test_undefined", "train.write_report=false"]),
            tmp_path / "w")
    finally:
        metrics_lib.unregister_metric("test_undefined")
    err = capsys.readouterr().err
    assert err.count("validation test_undefined (train.monitor) is undefined") == 1, err
    assert "at step 4" in err and "the first epoch stays the best" in err
    assert result.best_step == 4 and result.best_value is None
    assert [row["test_undefined"] for row in _valid_rows(tmp_path / "w")] == [None, None]


@pytest.mark.parametrize("setting", ["train.monitor=test_broken", "report.metrics=test_broken"])
def test_a_metric_of_your_own_that_fails_on_any_input_stops_the_run_before_training(
        tiny, tmp_path, setting):
    """A monitored metric with a bug used to stop the run after its first epoch (that epoch's
    checkpoint lost), and a report metric's only showed as n/a after the whole training: both
    are now tried once on the validation labels before the first step."""
    from haaqi_jax.train import metrics as metrics_lib
    _, overrides = tiny
    calls = []

    def broken(pred, true, weight):
        calls.append((pred.size, float(np.std(pred)), float(np.max(np.abs(pred - true)))))
        return {"mae": 0.1}["mea"]

    metrics_lib.register_metric("test_broken", broken, higher_is_better=False)
    try:
        with pytest.raises(ValueError) as err:
            loop.train_and_evaluate(_config(overrides + [setting]), tmp_path / "w")
    finally:
        metrics_lib.unregister_metric("test_broken")
    key = setting.split("=")[0]
    assert (f"{key}: metric 'test_broken' fails on the 4 valid labels and a trial prediction "
            f"of them, before training: KeyError: 'mea'") in str(err.value)
    assert isinstance(err.value.__cause__, KeyError)
    assert not (tmp_path / "w" / loop.CHECKPOINT_DIR).exists()
    (size, spread, gap), = calls      # tried once, on a prediction that varies and is no copy
    assert size == 4 and spread > 0 and 0 < gap < 0.2


def test_adamw_with_clipping_matches_torch():
    """optimizer.name=adamw with weight_decay and grad_clip_norm against torch.optim.AdamW and
    torch.nn.utils.clip_grad_norm_ on a fixed gradient sequence."""
    import torch
    from ml_collections import ConfigDict
    import optax
    from haaqi_jax.train import state as state_lib

    opt = ConfigDict({"name": "adamw", "learning_rate": 1e-2, "schedule": "constant",
                      "warmup_steps": 0, "grad_clip_norm": 0.5, "weight_decay": 0.1,
                      "b1": 0.9, "b2": 0.99})
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5,)).astype(np.float32)
    grads = [rng.normal(scale=s, size=(5,)).astype(np.float32) for s in (0.1, 3.0, 0.2, 5.0)]
    params = {"w": jnp.asarray(w0)}
    tx = state_lib.make_optimizer(opt, state_lib.param_labels(params), total_steps=4)
    opt_state = tx.init(params)
    theirs = torch.nn.Parameter(torch.tensor(w0))
    torch_opt = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.99), eps=1e-8,
                                  weight_decay=0.1)
    for g in grads:
        updates, opt_state = tx.update({"w": jnp.asarray(g)}, opt_state, params)
        params = optax.apply_updates(params, updates)
        theirs.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_([theirs], 0.5)
        torch_opt.step()
        np.testing.assert_allclose(params["w"], theirs.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_warmup_and_cosine_schedule_match_torch():
    """warmup_steps then cosine decay to 0 against torch's LinearLR + CosineAnnealingLR."""
    import torch
    from ml_collections import ConfigDict
    from haaqi_jax.train import state as state_lib

    lr, warmup, total = 1e-3, 3, 10
    schedule = state_lib.make_schedule(
        ConfigDict({"learning_rate": lr, "schedule": "cosine", "warmup_steps": warmup}), total)
    param = torch.nn.Parameter(torch.zeros(1))
    torch_opt = torch.optim.SGD([param], lr=lr)
    torch_schedule = torch.optim.lr_scheduler.SequentialLR(torch_opt, [
        torch.optim.lr_scheduler.LinearLR(torch_opt, start_factor=1e-12, end_factor=1.0,
                                          total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(torch_opt, T_max=total - warmup)],
        milestones=[warmup])
    for step in range(total):
        np.testing.assert_allclose(float(schedule(step)), torch_schedule.get_last_lr()[0],
                                   rtol=1e-5, atol=1e-12)
        torch_opt.step()
        torch_schedule.step()
    # Without optimizer.schedule the rate is constant (the paper's), as the docstring says.
    constant = state_lib.make_schedule(ConfigDict({"learning_rate": lr}), total)
    assert [float(constant(step)) for step in (0, total // 2, total - 1)] == [lr] * 3


def test_raising_patience_on_a_resume_trains_on(tiny, tmp_path, capsys):
    """README: train.patience may change on a resume. A run that had stopped early used to
    resume into an immediate stop, whatever the new patience, without a word."""
    _, overrides = tiny
    # min_delta 10: no epoch after the first improves, so patience 1 stops after epoch 2.
    base = overrides + ["train.num_epochs=4", "optimizer.schedule=constant",
                        "train.min_delta=10.0", "train.write_report=False"]
    first = loop.train_and_evaluate(_config(base + ["train.patience=1"]), tmp_path / "w")
    assert first.stopped_early and int(first.state.step) == 8
    again = loop.train_and_evaluate(_config(base + ["train.patience=1"]), tmp_path / "w")
    assert again.stopped_early and int(again.state.step) == 8
    assert "raise train.patience, or set it to 0, to train on" in capsys.readouterr().err
    longer = loop.train_and_evaluate(_config(base + ["train.patience=0"]), tmp_path / "w")
    assert not longer.stopped_early and int(longer.state.step) == 16


def test_patience_running_out_on_the_last_epoch_is_no_early_stop(tiny, tmp_path, capsys):
    """Every planned step ran, so train.py must not say "stopped early at step 8" (nor the
    report's training.json stopped_early), as it did when patience ran out on the last epoch."""
    _, overrides = tiny
    base = overrides + ["optimizer.schedule=constant", "train.min_delta=10.0",
                        "train.patience=1"]
    result = loop.train_and_evaluate(_config(base + ["train.num_epochs=2"]), tmp_path / "w")
    assert int(result.state.step) == 8 and result.final_step == 8     # 2 epochs of 4 steps
    assert not result.stopped_early
    summary = json.loads((result.report_dir / "training.json").read_text())
    assert summary["stopped_early"] is False
    # One more planned epoch: the same patience does stop the run early.
    early = loop.train_and_evaluate(
        _config(base + ["train.num_epochs=3", "train.write_report=False"]), tmp_path / "w3")
    assert early.stopped_early and early.final_step == 8


def test_grad_norm_is_the_norm_that_clipping_sees():
    """Logged grad_norm: the model's trainable leaves only, not frozen ones nor a loss's own
    parameters (those have their own unclipped optimizer)."""
    from ml_collections import ConfigDict
    from haaqi_jax.train import state as state_lib
    from haaqi_jax.train import steps as steps_lib

    params = {"w": jnp.ones(3), "frozen": jnp.ones(2), "loss": {"s": jnp.zeros(())}}
    labels = {"w": state_lib.TRAINABLE, "frozen": state_lib.FROZEN,
              "loss": {"s": state_lib.LOSS_PARAMS}}
    tx = state_lib.make_optimizer(ConfigDict({"name": "adam", "learning_rate": 1e-2,
                                              "grad_clip_norm": 1.0,
                                              "loss_params_learning_rate": 1e-2}), labels, 10)
    w_grad = np.array([3.0, -4.0, 12.0], np.float32)
    forward = lambda p, batch, rng=None, deterministic=True: p
    loss_fn = lambda p, batch: (jnp.dot(p["w"], w_grad) + 7.0 * p["frozen"].sum()
                                + 100.0 * p["loss"]["s"], {})
    state = state_lib.create_train_state(params, tx, 0)
    _, metrics = steps_lib.make_train_step(forward, loss_fn, tx, labels)(
        state, {"weight": jnp.ones(1)})
    assert float(metrics["grad_norm"]) == pytest.approx(np.linalg.norm(w_grad), rel=1e-6)


def test_damaged_or_shared_workdirs_are_recovered_or_named(straight_run, tiny, tmp_path):
    """What a kill, an editor or a second run can do to a workdir: a metrics line cut short
    and a damaged newest checkpoint are recovered from (the run ends as an uninterrupted one,
    bit for bit); a second run on the workdir, a lost config.json and a damaged data.json are
    refused naming the file."""
    import shutil

    from haaqi_jax.files import exclusive_lock
    from haaqi_jax.train.checkpoint import TrainCheckpointManager

    _, overrides = tiny
    work = tmp_path / "work"
    loop.train_and_evaluate(_config(overrides + ["train.stop_after_steps=7"]), work)
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 8, "lo')                   # killed mid-line
    ckpt = TrainCheckpointManager(work / "checkpoints")
    newest = ckpt.latest_step()
    assert len(ckpt.all_steps()) == 2
    ckpt.close()
    shutil.rmtree(work / "checkpoints" / str(newest) / "meta")        # deleted by hand

    with exclusive_lock(work / loop.LOCK_FILE, "held by this test"):
        with pytest.raises(ValueError, match=rf"another run is writing {work} \(lock "):
            loop.train_and_evaluate(_config(overrides), work)

    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        result = loop.train_and_evaluate(_config(overrides), work)
    assert (f"checkpoints/{newest}: the checkpoint of step {newest} cannot be restored"
            in err.getvalue()) and "trying the one before it" in err.getvalue()
    # Moved aside, not deleted: the files stay for a look.
    assert (work / "checkpoints" / f"damaged-{newest}" / "state").is_dir()
    assert result.final_step == 8
    a, b = _flat(straight_run.state), _flat(result.state)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert ((work / "metrics.jsonl").read_text()
            == (straight_run.workdir / "metrics.jsonl").read_text())

    (work / "data.json").write_text('{"manifest": ')
    with pytest.raises(ValueError, match=r"data.json \(the record of the run's data\) is "
                                         r"damaged: not JSON"):
        loop.train_and_evaluate(_config(overrides), work)
    (work / "config.json").unlink()
    with pytest.raises(ValueError, match=r"holds a run \(checkpoints or a report\) but no "
                                         r"config.json"):
        loop.train_and_evaluate(_config(overrides), work)


def _toy_forward(params, batch, *, rng=None, deterministic=True):
    """clip score = x . w through inverted dropout at rate 0.5 (none when deterministic)."""
    x = batch["x"]
    if not deterministic:
        keep = jax.random.bernoulli(rng, 0.5, x.shape)
        x = jnp.where(keep, x / 0.5, 0.0)
    return {"clip_score": x @ params["w"]}


def _toy_loss(predictions, batch):
    from haaqi_jax.losses import weighted_mean
    return weighted_mean((predictions["clip_score"] - batch["label"]) ** 2, batch["weight"]), {}


def test_each_train_step_draws_its_own_dropout_mask():
    """Dropout uses fold_in(state.rng, step): the same batch at two steps sees two masks (one
    mask for every step would train a fixed sub-network)."""
    import optax
    from haaqi_jax.train import state as state_lib
    from haaqi_jax.train import steps as steps_lib

    params = {"w": jnp.linspace(-1.0, 1.0, 16)}
    tx = optax.sgd(0.0)                               # the parameters stay put
    labels = state_lib.param_labels(params)
    step = jax.jit(steps_lib.make_train_step(_toy_forward, _toy_loss, tx, labels))
    batch = {"x": jnp.ones((4, 16)), "label": jnp.zeros(4), "weight": jnp.ones(4)}
    state = state_lib.create_train_state(params, tx, seed=3)
    seen = []
    for k in range(3):
        state, metrics = step(state, batch)
        want = _toy_loss(_toy_forward(params, batch, rng=jax.random.fold_in(
            jax.random.PRNGKey(3), k), deterministic=False), batch)[0]
        assert float(metrics["loss"]) == pytest.approx(float(want), rel=1e-6)
        seen.append(float(metrics["loss"]))
    assert len(set(seen)) == 3


def test_evaluation_weights_each_real_item_once_across_batches():
    """Filler items (weight 0) pad the last batches; the set's loss is the mean over the real
    items, however they fall into batches."""
    from haaqi_jax.train import steps as steps_lib

    params = {"w": jnp.asarray([0.5, -0.25])}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 2)).astype(np.float32)
    label = rng.uniform(size=8).astype(np.float32)
    weights = [np.array([1, 1, 1, 0], np.float32), np.array([1, 0, 0, 0], np.float32)]
    eval_step = jax.jit(steps_lib.make_eval_step(_toy_forward, _toy_loss))
    outs = [eval_step(params, {"x": jnp.asarray(x[4 * i:4 * i + 4]),
                               "label": jnp.asarray(label[4 * i:4 * i + 4]),
                               "weight": jnp.asarray(w)}) for i, w in enumerate(weights)]
    loss = sum(float(o["loss_sum"]) for o in outs) / sum(float(o["weight_sum"]) for o in outs)
    real = np.concatenate([w > 0 for w in weights])
    want = np.mean((x[real] @ np.asarray(params["w"]) - label[real]) ** 2)
    assert loss == pytest.approx(float(want), rel=1e-5)


def test_a_checkpoint_that_fails_for_want_of_memory_is_not_taken_for_damaged(tmp_path,
                                                                             monkeypatch):
    """Only damaged files send the resume to an older checkpoint: an out-of-memory error (or a
    permission error) is the machine's, and the newest checkpoint must survive it."""
    from haaqi_jax.train.checkpoint import DamagedCheckpointError, TrainCheckpointManager

    ckpt = TrainCheckpointManager(tmp_path / "ckpt")
    state = {"w": jnp.arange(3.0)}
    for step in (1, 3):
        ckpt.save(step, {"w": state["w"] + step}, {"step": step}, keep=[1, 3])
    real = ckpt._manager.restore

    def short_of_memory(step, *args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 3397388488 bytes.")

    monkeypatch.setattr(ckpt._manager, "restore", short_of_memory)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        ckpt.restore_latest(state, warn=lambda text: None)
    assert sorted(ckpt.all_steps()) == [1, 3]
    monkeypatch.setattr(ckpt._manager, "restore", real)
    step, restored, meta = ckpt.restore_latest(state, warn=lambda text: None)
    assert step == 3 and meta == {"step": 3}
    np.testing.assert_array_equal(restored["w"], np.arange(3.0) + 3)
    # A template of another structure fails every step: named as such, nothing moved.
    with pytest.raises(DamagedCheckpointError, match="another structure than this code"):
        ckpt.restore_latest({"w": jnp.arange(4.0)}, warn=lambda text: None)
    assert sorted(ckpt.all_steps()) == [1, 3]
    ckpt.close()


# ----------------------------------------------------------------------------- train.ema_decay


def test_ema_is_the_bias_corrected_average_of_the_steps_params():
    """train.ema_decay: after t steps the state's ema_params are sum_i d**(t-i) p_i / sum_i
    d**(t-i) over the parameters after steps 1..t (numpy, from the params each step left),
    through the jitted, donating, replicated step; frozen leaves stay bit for bit; the
    average changes nothing in training (the same params as without it)."""
    import optax
    from haaqi_jax.train import sharding
    from haaqi_jax.train import state as state_lib
    from haaqi_jax.train import steps as steps_lib

    decay = 0.8
    params = {"w": jnp.linspace(-1.0, 1.0, 16), "frozen": jnp.array([-0.0, 2.5])}
    labels = {"w": state_lib.TRAINABLE, "frozen": state_lib.FROZEN}
    tx = state_lib.make_optimizer(cfglib.ConfigDict({"name": "adam", "learning_rate": 0.05}),
                                  labels, 10)
    forward = lambda p, batch, **kw: {
        "clip_score": _toy_forward(p, batch, **kw)["clip_score"] + p["frozen"][1]}
    mesh = sharding.make_mesh()
    eval_step = steps_lib.make_eval_step(forward, _toy_loss)
    plain_step, _ = steps_lib.jit_steps(
        steps_lib.make_train_step(forward, _toy_loss, tx, labels), eval_step, mesh)
    ema_step, _ = steps_lib.jit_steps(
        steps_lib.make_train_step(forward, _toy_loss, tx, labels, ema_decay=decay), eval_step,
        mesh)
    fresh = lambda: jax.tree_util.tree_map(jnp.copy, params)   # each state donates its own
    plain = sharding.replicate(state_lib.create_train_state(fresh(), tx, 3), mesh)
    state = sharding.replicate(state_lib.create_train_state(fresh(), tx, 3, ema_decay=decay),
                               mesh)
    assert plain.ema_params is None
    np.testing.assert_array_equal(state.ema_params["w"], params["w"])   # until the first step
    rng = np.random.default_rng(0)
    history = []
    for t in range(1, 6):
        batch = {"x": jnp.asarray(rng.standard_normal((4, 16)), jnp.float32),
                 "label": jnp.asarray(rng.uniform(size=4), jnp.float32),
                 "weight": jnp.ones(4)}
        plain, _ = plain_step(plain, batch)
        state, _ = ema_step(state, batch)
        np.testing.assert_array_equal(state.params["w"], plain.params["w"])
        history.append(np.asarray(state.params["w"], np.float64))
        weights = decay ** np.arange(t - 1, -1, -1.0)
        want = weights @ np.stack(history) / weights.sum()
        np.testing.assert_allclose(state.ema_params["w"], want, rtol=1e-5, atol=1e-6)
        assert int(state.step) == t
    assert not np.allclose(state.ema_params["w"], state.params["w"])
    assert np.signbit(np.asarray(state.ema_params["frozen"])[0])      # -0.0 kept as it was
    np.testing.assert_array_equal(state.ema_params["frozen"], params["frozen"])
    assert state_lib.eval_params(state) is state.ema_params
    assert state_lib.eval_params(plain) is plain.params


def test_ema_decay_zero_adds_nothing_to_the_state(straight_run):
    """train.ema_decay=0 (the default): the train state has exactly the leaves it had before
    the option existed (no ema_params), so its steps, checkpoints and results are those of
    before, and checkpoints made before it resume."""
    assert straight_run.state.ema_params is None
    assert all(".ema_params" not in k for k in _flat(straight_run.state))
    assert {k.split("[")[0].split(".")[1] for k in _flat(straight_run.state)} == {
        "step", "params", "opt_state", "rng"}


def test_ema_run_resumes_exactly_and_reports_the_average(tiny, tmp_path):
    """train.ema_decay=0.9: the moving average is checkpointed and resumed bit for bit (a run
    stopped after step 5 and continued equals the straight one), validation scores it, and
    the report's best_model holds the best checkpoint's average, not its parameters."""
    from haaqi_jax.train.checkpoint import TrainCheckpointManager, load_params

    root, overrides = tiny
    overrides = overrides + ["train.ema_decay=0.9"]
    straight = loop.train_and_evaluate(_config(overrides), tmp_path / "straight")
    work = tmp_path / "resumed"
    first = loop.train_and_evaluate(_config(overrides + ["train.stop_after_steps=5"]), work)
    assert first.interrupted and first.state.ema_params is not None
    resumed = loop.train_and_evaluate(_config(overrides), work)
    a, b = _flat(straight.state), _flat(resumed.state)
    assert a.keys() == b.keys() and any(".ema_params" in k for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert ((work / "metrics.jsonl").read_text()
            == (straight.workdir / "metrics.jsonl").read_text())

    ckpt = TrainCheckpointManager(straight.workdir / "checkpoints")
    best, _ = ckpt.restore(straight.best_step, straight.state)
    ckpt.close()
    exported, _ = load_params(straight.report_dir / "best_model")
    got, ema, raw = _flat(exported["head"]), _flat(best.ema_params["head"]), _flat(
        best.params["head"])
    assert got.keys() == ema.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], ema[k], err_msg=k)
    assert any(not np.array_equal(got[k], raw[k]) for k in got)


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_ema_decay_out_of_range_is_refused(tiny, tmp_path, value):
    """Before anything is built: 1 would never move the average, a negative decay is none."""
    from haaqi_jax.train import state as state_lib

    _, overrides = tiny
    with pytest.raises(ValueError, match=r"train.ema_decay must be a number in \[0, 1\)"):
        loop.train_and_evaluate(_config(overrides + [f"train.ema_decay={value}"]),
                                tmp_path / "work")
    assert not (tmp_path / "work").exists()
    with pytest.raises(ValueError, match=r"train.ema_decay must be a number .* got '0.9'"):
        state_lib.check_ema_decay("0.9")


def test_a_distillation_refuses_an_ema():
    """A distillation's loop validates its parameters; a moving average it would not use is
    refused rather than ignored."""
    cfg = cfglib.get_config(REPO / "configs" / "distill.py", ["train.ema_decay=0.5"])
    with pytest.raises(ValueError, match=r"train.ema_decay=0.5: a distillation keeps no "
                                         r"moving average"):
        loop.check_run_settings(cfg)
