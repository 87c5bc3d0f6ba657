"""The `haaqi-jax` boundary: exit codes, one-line errors, interruption, output-path checks."""

from __future__ import annotations

import pytest

from haaqi_jax import cli
from haaqi_jax.haaqi import score_cli


def _raise(error):
    def run(args):
        raise error
    return run


@pytest.mark.parametrize("error, code, message", [
    (ValueError("manifest m.jsonl: line 3: bad JSON"), 2, "error: manifest m.jsonl: line 3"),
    (FileNotFoundError("no such file: x.wav"), 2, "error: no such file: x.wav"),
    (KeyboardInterrupt(), 130, "interrupted; finished work is kept"),
])
def test_user_errors_are_one_line_and_interruption_exits_130(monkeypatch, capsys, error, code,
                                                            message):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    monkeypatch.setattr(score_cli, "run", _raise(error))
    assert cli.main(["score", "r.wav", "p.wav", "--audiogram", "0,0,0,0,0,0,0,0"]) == code
    err = capsys.readouterr().err
    assert err.startswith("haaqi-jax score: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["predict", "--checkpoint", "ck", "--audiogram", "0,0,0,0,0,0,0,0", "music", "--out",
     "r.csv"],
    ["evaluate", "--model", "m", "--manifest", "m.jsonl", "--out", "eval"],
    ["label", "pairs.jsonl", "--out", "labels.jsonl"],
])
def test_interrupting_a_resumable_command_says_that_it_resumes(monkeypatch, capsys, argv):
    """README: predict and evaluate resume, as label does, when the same command runs again.
    Their Ctrl-C line said "(label, demo-data: the same command resumes)", as if they did
    not."""
    import importlib
    monkeypatch.setattr(importlib.import_module(cli.SUBCOMMANDS[argv[0]][0]), "run",
                        _raise(KeyboardInterrupt()))
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert err == (f"haaqi-jax {argv[0]}: interrupted; finished work is kept (run the same "
                   f"command again to resume)\n")


def test_the_traceback_on_request_and_bugs_are_not_swallowed(monkeypatch):
    monkeypatch.setattr(score_cli, "run", _raise(ValueError("bad input")))
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="bad input"):
        cli.main(["score", "r.wav", "p.wav", "--audiogram", "0,0,0,0,0,0,0,0"])
    monkeypatch.delenv(cli.TRACEBACK_ENV)
    monkeypatch.setattr(score_cli, "run", _raise(KeyError("a bug")))   # not a user error
    with pytest.raises(KeyError):
        cli.main(["score", "r.wav", "p.wav", "--audiogram", "0,0,0,0,0,0,0,0"])


def test_output_checks_name_the_problem_and_create_nothing(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="--out .* is a folder"):
        cli.writable_file(tmp_path, "--out")
    with pytest.raises(ValueError, match=r"cannot be written: .*file.txt is a file"):
        cli.writable_file(tmp_path / "file.txt" / "out.csv", "--out")
    with pytest.raises(ValueError, match="--out .* is a file"):
        cli.writable_folder(tmp_path / "file.txt", "--out")
    deep = tmp_path / "a" / "b" / "out.csv"
    assert cli.writable_file(deep, "--out") == deep and not (tmp_path / "a").exists()
    assert cli.writable_folder(tmp_path / "report", "--out") == tmp_path / "report"
    assert not (tmp_path / "report").exists()


def test_positive_int():
    assert cli.positive_int("3") == 3
    for text in ("0", "-2", "abc", "1.5"):
        with pytest.raises(Exception, match="expected"):
            cli.positive_int(text)


def test_import_option_loads_a_users_module(tmp_path, monkeypatch, capsys):
    """`haaqi-jax --import MODULE` (a name from here, or a .py file) runs before the command:
    how a model with a user's own encoder is loaded by predict or evaluate."""
    from haaqi_jax import cli, model

    (tmp_path / "my_encoder_mod.py").write_text(
        "from haaqi_jax.model import register_encoder\n"
        "from haaqi_jax.fbank_patches import FbankPatches, FbankPatchesConfig\n"
        "register_encoder('my_patches', lambda cfg: FbankPatches(FbankPatchesConfig.from_dict"
        "(cfg)), lambda: FbankPatchesConfig().to_dict())\n")
    missing = str(tmp_path / "no_report")
    assert cli.main(["--import", str(tmp_path / "my_encoder_mod.py"), "compare", missing]) == 1
    assert "my_patches" in model._ENCODERS
    del model._ENCODERS["my_patches"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(__import__("sys").modules, "my_encoder_mod", raising=False)
    assert cli.main(["--import", "my_encoder_mod", "compare", missing]) == 1
    assert "my_patches" in model._ENCODERS
    capsys.readouterr()
    assert cli.main(["--import", "no_such_module_here", "compare", missing]) == 2
    assert "--import no_such_module_here: no module of that name" in capsys.readouterr().err
    del model._ENCODERS["my_patches"]


def test_ctrl_c_in_a_real_label_process_exits_130(tmp_path):
    """A real process interrupted mid-run exits 130 with its message. Python's teardown under
    XLA's threads crashed a 20-row `label` interrupted 5-8 s in with SIGSEGV (8 of 8 tries on
    a QA manifest) until `exit_with` skipped the teardown; this smaller run did not reproduce
    the crash, so it guards the exit code and message of a real interrupt only."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    rows = []
    # One compilation per rate, a reader thread; enough rows after the compilations that the
    # interrupt always lands mid-run (with 12 rows a fast run once finished first).
    for rate in (16000, 24000, 44100, 48000) * 12:
        ref = 0.3 * rng.standard_normal(rate)
        sf.write(tmp_path / f"ref{rate}.wav", ref, rate)
        sf.write(tmp_path / f"proc{rate}.wav", 0.5 * ref, rate)
        rows.append({"id": f"{rate}_{len(rows)}", "reference": f"ref{rate}.wav",
                     "processed": f"proc{rate}.wav", "audiogram": [10, 10, 20, 30, 40, 50, 60, 60]})
    stereo = 0.3 * rng.standard_normal((24000, 2))
    sf.write(tmp_path / "ref_st.wav", stereo, 24000)
    sf.write(tmp_path / "proc_st.wav", 0.5 * stereo, 24000)
    for i in range(4):
        rows.append({"id": f"st{i}", "reference": "ref_st.wav", "processed": "proc_st.wav",
                     "audiogram_left": [10] * 8, "audiogram_right": [30] * 8})
        rows.append({"id": f"gone{i}", "reference": "nope.wav", "processed": "proc_st.wav",
                     "audiogram": [10] * 8})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo),
                                                       os.environ.get("PYTHONPATH", "")]))
    # The child sets Python's SIGINT handler itself: an inherited SIG_IGN (a runner started
    # as a background job) would leave it without one. Suspected, not proven, cause of this
    # test failing twice in fresh-clone CI simulations (the run ignored the SIGINT).
    launch = ("import runpy, signal, sys; signal.signal(signal.SIGINT, "
              "signal.default_int_handler); sys.argv[0] = 'haaqi-jax'; "
              "runpy.run_module('haaqi_jax.cli', run_name='__main__')")
    proc = subprocess.Popen(
        [sys.executable, "-c", launch, "label", str(tmp_path / "m.jsonl"), "--out",
         str(tmp_path / "out" / "labels.jsonl"), "--batch-size", "1"], env=env,
        stderr=subprocess.PIPE)   # (no preexec_fn: a fork of this JAX process is unsafe)
    seen = b""
    while b"ok=2" not in seen:     # mid-run: rows scored, the reader thread busy
        chunk = proc.stderr.read1(4096)
        assert chunk, seen.decode(errors="replace")[-2000:]
        seen += chunk
    proc.send_signal(signal.SIGINT)
    seen += proc.stderr.read()
    assert proc.wait(timeout=120) == 130, seen.decode(errors="replace")[-2000:]
    assert b"interrupted; finished work is kept" in seen


@pytest.mark.parametrize("seed", ["-1", "4294967296", "1.5", "x"])
def test_score_seed_outside_numpy_s_range_is_refused_naming_the_option(capsys, seed):
    """numpy's 'Seed must be between 0 and 2**32 - 1' named no option."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["score", "r.wav", "p.wav", "--audiogram", "0,0,0,0,0,0,0,0", "--seed", seed])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --seed: expected a whole number from 0 to 4294967295, got {seed!r}" in err
