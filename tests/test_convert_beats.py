"""BEATs checkpoint conversion: round trip through files, strict errors, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import beats_reference as ref
from haaqi_jax.beats import BEATs, load_beats
from haaqi_jax.convert.beats_torch import (beats_params_from_state_dict,
                                           convert_beats_checkpoint)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def state_dict():
    return ref.make_beats_state_dict(ref.TINY_CFG, 3)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_convert_and_load_matches_speechbrain(tmp_path, state_dict, kaldi):
    src = ref.save_official_checkpoint(tmp_path / "beats.pt", ref.TINY_CFG, state_dict)
    out = convert_beats_checkpoint(src, tmp_path / "converted")
    model, params = load_beats(out)
    assert isinstance(model, BEATs) and model.config.encoder_layers == 2
    wav = np.random.default_rng(0).uniform(-0.5, 0.5, (1, 20000)).astype(np.float32)
    ours = model.apply({"params": params}, jnp.asarray(wav))
    fbank = ref.torch_kaldi_fbank(kaldi, wav)
    expected, _ = ref.speechbrain_hidden_states(ref.speechbrain_beats(src), wav, fbank=fbank)
    np.testing.assert_allclose(np.asarray(ours.last_hidden_state), expected[-1], atol=1e-3)
    with pytest.raises(FileExistsError):
        convert_beats_checkpoint(src, out)
    assert convert_beats_checkpoint(src, out, overwrite=True) == out


def test_finetuned_round_trip_keeps_predictor_and_labels(tmp_path):
    cfg = dict(ref.TINY_CFG, finetuned_model=True)
    sd = ref.make_beats_state_dict(cfg, 4)
    src = ref.save_official_checkpoint(tmp_path / "ft.pt", cfg, sd, finetuned=True)
    out = convert_beats_checkpoint(src, tmp_path / "ft")
    model, params = load_beats(out)
    np.testing.assert_array_equal(params["predictor"]["kernel"], sd["predictor.weight"].numpy().T)
    from haaqi_jax.train.checkpoint import load_config
    assert len(load_config(out)["label_dict"]) == 527


def test_last_layer_copy_of_shared_bias_is_used(state_dict):
    params = beats_params_from_state_dict(state_dict, ref.TINY_CFG)
    last = state_dict["encoder.layers.1.self_attn.relative_attention_bias.weight"].numpy()
    np.testing.assert_array_equal(params["relative_position_bias"]["embedding"], last)


def test_parametrized_weight_norm_names_accepted(state_dict):
    renamed = dict(state_dict)
    renamed["encoder.pos_conv.0.parametrizations.weight.original0"] = renamed.pop(
        "encoder.pos_conv.0.weight_g")
    renamed["encoder.pos_conv.0.parametrizations.weight.original1"] = renamed.pop(
        "encoder.pos_conv.0.weight_v")
    a = beats_params_from_state_dict(state_dict, ref.TINY_CFG)
    b = beats_params_from_state_dict(renamed, ref.TINY_CFG)
    np.testing.assert_array_equal(a["pos_conv"]["weight_v"], b["pos_conv"]["weight_v"])


def test_prefixed_state_dict(state_dict):
    prefixed = {f"beats_model.{k}": v for k, v in state_dict.items()}
    prefixed["linear0.weight"] = torch.zeros(3, 3)          # a head key: ignored
    params = beats_params_from_state_dict(prefixed, ref.TINY_CFG, prefix="beats_model.")
    np.testing.assert_array_equal(params["layers_0"]["fc1"]["kernel"],
                                  state_dict["encoder.layers.0.fc1.weight"].numpy().T)


def _broken(state_dict, kind):
    sd = dict(state_dict)
    if kind == "missing":
        del sd["encoder.layers.1.self_attn.grep_a"]
        return sd, "missing key.*encoder.layers.1.self_attn.grep_a"
    if kind == "unexpected":
        sd["encoder.layers.2.fc1.weight"] = torch.zeros(128, 64)
        return sd, "unexpected key.*encoder.layers.2.fc1.weight"
    if kind == "shape":
        sd["encoder.layers.0.fc2.weight"] = torch.zeros(64, 127)
        return sd, r"encoder.layers.0.fc2.weight.*shape \(64, 127\)"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_bad_state_dicts_raise_and_write_nothing(tmp_path, state_dict, kind):
    sd, match = _broken(state_dict, kind)
    with pytest.raises(ValueError, match=match):
        beats_params_from_state_dict(sd, ref.TINY_CFG)
    src = ref.save_official_checkpoint(tmp_path / "bad.pt", ref.TINY_CFG, sd)
    with pytest.raises(ValueError, match=match):
        convert_beats_checkpoint(src, tmp_path / "out")
    assert _leftovers(tmp_path) == ["bad.pt"]


@pytest.mark.parametrize("payload, match", [
    ({"model": {}}, "missing key 'cfg'"),
    ({"cfg": dict(ref.TINY_CFG)}, "missing key 'model'"),
    ([1, 2, 3], "expected a dict"),
])
def test_not_a_beats_checkpoint(tmp_path, payload, match):
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=match):
        convert_beats_checkpoint(tmp_path / "other.pt", tmp_path / "out")
    assert _leftovers(tmp_path) == ["other.pt"]


def test_plain_state_dict_is_rejected(tmp_path, state_dict):
    torch.save(state_dict, tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="missing key 'cfg'"):
        convert_beats_checkpoint(tmp_path / "sd.pt", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        convert_beats_checkpoint(tmp_path / "absent.pt", tmp_path / "out")


def test_cli(tmp_path, state_dict):
    src = ref.save_official_checkpoint(tmp_path / "beats.pt", ref.TINY_CFG, state_dict)
    ok = subprocess.run([sys.executable, str(REPO / "convert_weights.py"), str(src),
                         str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "config.json").is_file()
    bad, _ = _broken(state_dict, "missing")
    bad_src = ref.save_official_checkpoint(tmp_path / "bad.pt", ref.TINY_CFG, bad)
    fail = subprocess.run([sys.executable, str(REPO / "convert_weights.py"), str(bad_src),
                           str(tmp_path / "out2")], capture_output=True, text=True, cwd=REPO)
    assert fail.returncode != 0
    assert "grep_a" in fail.stderr and not (tmp_path / "out2").exists()


def test_overwrite_replaces_only_an_earlier_output(tmp_path, state_dict, monkeypatch):
    """--overwrite once deleted any folder: the current one given as "" (an unset shell
    variable), or a folder of other models. Now it replaces only config.json + params/."""
    src = ref.save_official_checkpoint(tmp_path / "beats.pt", ref.TINY_CFG, state_dict)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("precious")
    monkeypatch.chdir(work)
    for target in ("", ".", str(work)):
        with pytest.raises((ValueError, FileExistsError),
                           match="output folder is empty|not a haaqi_jax parameter folder"):
            convert_beats_checkpoint(src, target, overwrite=True)
    assert (work / "notes.txt").read_text() == "precious"
    out = convert_beats_checkpoint(src, tmp_path / "out")
    assert convert_beats_checkpoint(src, out, overwrite=True) == out      # its own output
    monkeypatch.chdir(tmp_path)         # a relative path below the current folder, as in the
    assert convert_beats_checkpoint(src, "out", overwrite=True) == out   # README (was refused)
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())     # not mkdtemp's 0700
    with pytest.raises(FileExistsError, match=r"already exists \(overwrite=True, or "
                                              r"--overwrite on the command line"):
        convert_beats_checkpoint(src, out)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        convert_beats_checkpoint(src, tmp_path / "afile", overwrite=True)
    with pytest.raises(FileExistsError, match="a parent of it is a file"):
        convert_beats_checkpoint(src, tmp_path / "afile" / "sub")


def _umask() -> int:
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_non_finite_weights_and_foreign_files_are_named(tmp_path, state_dict):
    bad = dict(state_dict)
    key = next(k for k in bad if k.endswith("fc1.weight"))
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    src = ref.save_official_checkpoint(tmp_path / "nan.pt", ref.TINY_CFG, bad)
    with pytest.raises(ValueError, match=rf"{key}.*non-finite values"):
        convert_beats_checkpoint(src, tmp_path / "out")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint|cannot be read"):
        convert_beats_checkpoint(tmp_path / "text.pt", tmp_path / "out")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="the file is empty"):
        convert_beats_checkpoint(tmp_path / "empty.pt", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="is a folder; give the .pt"):
        convert_beats_checkpoint(tmp_path, tmp_path / "out")
    torch.save({"model": {"beats_model.x": torch.zeros(1)}}, tmp_path / "hq.pth")
    with pytest.raises(ValueError, match="convert it with --haaqinet"):
        convert_beats_checkpoint(tmp_path / "hq.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, state_dict):
    src = ref.save_official_checkpoint(tmp_path / "beats.pt", ref.TINY_CFG, state_dict)
    (tmp_path / "text.pt").write_text("garbage")
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "convert_weights.py"), *a],  # noqa
                                    capture_output=True, text=True, cwd=tmp_path)
    ok = run(str(src), "out")
    assert ok.returncode == 0 and "BEATs, 2 layers x" in ok.stdout, ok.stderr
    fail = run("text.pt", "out2")
    assert fail.returncode == 2 and len(fail.stderr.strip().splitlines()) == 1, fail.stderr
    assert "Traceback" not in fail.stderr
    assert run("--haaqinet", "--allow-pickle", str(src), "o").returncode == 2
