"""convert_haaqinet on a synthetic file in the released layout -> HAAQINet.load -> predict,
against the PyTorch reference pipeline: speechbrain BEATs + the torch head, one clip at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from haaqi_jax.convert.haaqinet_torch import convert_haaqinet
from haaqi_jax.model import HAAQINet
from beats_reference import TINY_CFG, make_beats_state_dict, save_official_checkpoint, \
    speechbrain_beats, torch_kaldi_fbank
from haaqinet_reference import make_head, make_student, torch_head_scores

SR = 16000
TOL = 1e-4


def _released_file(path, num_layers, seed=0):
    beats_sd = make_beats_state_dict(TINY_CFG, seed)
    head = make_head(seed + 1, feature_dim=TINY_CFG["encoder_embed_dim"],
                     num_weighted_layers=num_layers)
    sd = {f"beats_model.{k}": v for k, v in beats_sd.items()}
    sd.update(head.state_dict())
    torch.save({"model": sd}, path)
    return beats_sd, head, sd


def _clips(seed, lengths, rate=SR):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        t = np.arange(n) / rate
        f0 = rng.uniform(110, 880)
        x = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in range(1, 6))
        out.append((0.2 * x * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
                    + 0.02 * rng.normal(size=n)).astype(np.float32))
    return out


@pytest.mark.parametrize("num_layers", [0, 2])
def test_converted_predict_matches_torch_pipeline(num_layers, tmp_path):
    beats_sd, head, _ = _released_file(tmp_path / "best_loss.pth", num_layers)
    out_dir = convert_haaqinet(tmp_path / "best_loss.pth", tmp_path / "jax",
                               beats_config=TINY_CFG)
    net = HAAQINet.load(out_dir)
    assert net.config.feature_mode == ("weighted" if num_layers else "last")
    if num_layers:
        assert net.config.feature_layers == (1, 2)  # the L layer outputs, as released

    save_official_checkpoint(tmp_path / "beats.pt", TINY_CFG, beats_sd)
    _assert_predicts_as_torch(net, tmp_path / "beats.pt", head, num_layers)


def _assert_predicts_as_torch(net, beats_pt, head, num_layers, seed=0):
    """net.predict on padded buckets == speechbrain BEATs (from beats_pt) + the torch head."""
    lengths = [16000, 9000, 24000, 4100]  # mixed: padded in shared buckets
    clips = _clips(num_layers + seed, lengths)
    levels = np.random.default_rng(7).uniform(0, 90, (len(clips), 8)).astype(np.float32)
    scores = net.predict(clips, SR, levels, batch_size=4, progress=False)

    sb = speechbrain_beats(beats_pt)  # all hidden states: (L+1, T, 1, C)
    feats = []
    with torch.no_grad():
        for clip in clips:  # one unpadded clip at a time, as the authors' code runs
            hidden = sb(torch.from_numpy(clip)[None], wav_lens=torch.ones(1))[0][:, :, 0]
            feats.append(hidden[1:].numpy() if num_layers else hidden[-1].numpy())
    _, ref = torch_head_scores(head, feats, levels)
    np.testing.assert_allclose(scores, ref, atol=TOL, rtol=0)
    assert np.std(ref) > 5 * TOL  # the clips really score differently


def _trainer_file(path, head):
    """The head alone, saved as the authors' trainer saves best_loss.pth: with the optimizer's
    state (after one real Adam step, so it holds tensors) and the epoch."""
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-4)
    head.train()
    x = torch.randn(1, 5, head.linear0.in_features)
    frames, _ = head([x] * head.num_weighted_layers if head.num_weighted_layers else x,
                     torch.zeros(1, 8))
    frames.mean().backward()
    with torch.no_grad():
        saved = {k: v.clone() for k, v in head.state_dict().items()}
    optimizer.step()
    head.load_state_dict(saved)  # the file holds the weights the reference uses
    head.eval()
    torch.save({"model": head.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3},
               path)


@pytest.mark.parametrize("num_layers,beats_as,lstm_layers", [(0, "pt", 1), (2, "folder", 3)])
def test_head_only_file_converts_with_its_beats(num_layers, beats_as, lstm_layers, tmp_path):
    """The authors' trainer saves the head alone (best_loss.pth); with the BEATs it was
    trained on (the official .pt, or that BEATs converted by us) it predicts as the torch
    pipeline of the authors' example script: BEATs from its own file, then the head (whose
    trainer config stacks BLSTM layers: 3 here)."""
    import subprocess
    import sys
    from pathlib import Path

    from haaqi_jax.convert.beats_torch import convert_beats_checkpoint
    beats_sd = make_beats_state_dict(TINY_CFG, 10 + num_layers)
    save_official_checkpoint(tmp_path / "beats.pt", TINY_CFG, beats_sd)
    head = make_head(11 + num_layers, feature_dim=TINY_CFG["encoder_embed_dim"],
                     num_weighted_layers=num_layers, lstm_layers=lstm_layers)
    _trainer_file(tmp_path / "best_loss.pth", head)
    beats = (tmp_path / "beats.pt" if beats_as == "pt"
             else convert_beats_checkpoint(tmp_path / "beats.pt", tmp_path / "beats_jax"))

    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(repo / "convert_weights.py"), "--haaqinet",
                          str(tmp_path / "best_loss.pth"), str(tmp_path / "jax"), "--beats",
                          str(beats)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"HAAQI-Net on BEATs {TINY_CFG['encoder_layers']} layers" in run.stdout
    assert (f"{lstm_layers} layers of " if lstm_layers > 1 else "BLSTM 100 x 2") in run.stdout
    net = HAAQINet.load(tmp_path / "jax")
    assert net.config.head.lstm_layers == lstm_layers
    assert net.config.feature_mode == ("weighted" if num_layers else "last")
    _assert_predicts_as_torch(net, tmp_path / "beats.pt", head, num_layers, seed=5)


def test_head_only_errors(tmp_path):
    """A head-only file without its BEATs, a full file with one, both BEATs options, and a
    BEATs of another width are each refused by name, and nothing is written."""
    import subprocess
    import sys
    from pathlib import Path

    beats_sd, head, sd = _released_file(tmp_path / "full.pth", 0)
    save_official_checkpoint(tmp_path / "beats.pt", TINY_CFG, beats_sd)
    torch.save({"model": head.state_dict()}, tmp_path / "head.pth")

    with pytest.raises(ValueError, match=r"head.pth is a head-only HAAQI-Net file.*--beats"):
        convert_haaqinet(tmp_path / "head.pth", tmp_path / "out")
    with pytest.raises(ValueError, match=r"full.pth holds its own encoder"):
        convert_haaqinet(tmp_path / "full.pth", tmp_path / "out",
                         beats_checkpoint=tmp_path / "beats.pt")
    with pytest.raises(ValueError, match="beats_checkpoint or beats_config, not both"):
        convert_haaqinet(tmp_path / "head.pth", tmp_path / "out", beats_config=TINY_CFG,
                         beats_checkpoint=tmp_path / "beats.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        convert_haaqinet(tmp_path / "head.pth", tmp_path / "out",
                         beats_checkpoint=tmp_path / "nope.pt")
    wide = dict(TINY_CFG, encoder_embed_dim=2 * TINY_CFG["encoder_embed_dim"],
                encoder_ffn_embed_dim=2 * TINY_CFG["encoder_ffn_embed_dim"])
    save_official_checkpoint(tmp_path / "wide.pt", wide, make_beats_state_dict(wide, 3))
    with pytest.raises(ValueError, match=r"head.pth: .*linear0.weight reads "
                                         rf"{TINY_CFG['encoder_embed_dim']} features"):
        convert_haaqinet(tmp_path / "head.pth", tmp_path / "out",
                         beats_checkpoint=tmp_path / "wide.pt")
    assert not (tmp_path / "out").exists()

    repo = Path(__file__).resolve().parents[1]
    for extra, message in [([], "--beats BEATs_iter3_plus_AS2M.pt"),
                           (["--beats", str(tmp_path / "beats.pt"), "--beats-config",
                             str(tmp_path / "beats.pt")], "drop --beats-config")]:
        run = subprocess.run([sys.executable, str(repo / "convert_weights.py"), "--haaqinet",
                              str(tmp_path / "head.pth"), str(tmp_path / "cli")] + extra,
                             capture_output=True, text=True)
        assert run.returncode == 2 and message in run.stderr, run.stderr
    run = subprocess.run([sys.executable, str(repo / "convert_weights.py"),
                          str(tmp_path / "beats.pt"), str(tmp_path / "cli"), "--beats",
                          str(tmp_path / "beats.pt")], capture_output=True, text=True)
    assert run.returncode == 2 and "go with --haaqinet" in run.stderr, run.stderr
    assert not (tmp_path / "cli").exists()


def _expect_error(tmp_path, sd, match, **kw):
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=match):
        convert_haaqinet(tmp_path / "bad.pth", tmp_path / "out", beats_config=TINY_CFG, **kw)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_conversion_errors_name_the_key_and_write_nothing(tmp_path):
    _, _, sd = _released_file(tmp_path / "ok.pth", 2)

    bad = dict(sd)
    del bad["haaqiframe_score.bias"]
    _expect_error(tmp_path, bad, "haaqiframe_score.bias")

    bad = dict(sd, **{"classifier.weight": torch.zeros(3)})
    _expect_error(tmp_path, bad, "classifier.weight")

    bad = dict(sd)
    bad["blstm.weight_hh_l0_reverse"] = torch.zeros(400, 99)
    _expect_error(tmp_path, bad, "blstm.weight_hh_l0_reverse")

    bad = dict(sd)
    bad["layer_norm.1.bias"] = torch.zeros(5)
    _expect_error(tmp_path, bad, "layer_norm.1.bias")

    bad = dict(sd)
    key = next(k for k in sd if k.startswith("beats_model.encoder.layers.0.fc1"))
    del bad[key]
    _expect_error(tmp_path, bad, key.removeprefix("beats_model."))

    _expect_error(tmp_path, dict(sd), "feature_layers", feature_layers=(1, 2, 3))

    _, _, sd = _released_file(tmp_path / "ok_last.pth", 0)
    bad = dict(sd)
    bad["linear0.weight"] = torch.zeros(256, 32)  # adapter width != encoder width
    _expect_error(tmp_path, bad, "linear0.weight reads 32 features")


def test_not_a_haaqinet_file(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        convert_haaqinet(tmp_path / "junk.pth", tmp_path / "out")
    torch.save({"model": {"classifier.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a HAAQI-Net checkpoint"):
        convert_haaqinet(tmp_path / "other.pth", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        convert_haaqinet(tmp_path / "missing.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_beats_dataparallel_nan_and_wrong_kind(tmp_path):
    """A HAAQI-Net on a non-released BEATs converts with its BEATs' cfg (CLI --beats-config
    from that BEATs' .pt); a DataParallel "module." prefix is removed; NaN encoder weights,
    a BEATs file and a missing --beats-config are refused by name."""
    import subprocess
    import sys
    from pathlib import Path

    from haaqi_jax.convert.haaqinet_torch import read_beats_config
    repo = Path(__file__).resolve().parents[1]
    beats_sd, _, sd = _released_file(tmp_path / "hq.pth", 0)
    save_official_checkpoint(tmp_path / "beats.pt", TINY_CFG, beats_sd)
    assert read_beats_config(tmp_path / "beats.pt")["encoder_layers"] == \
        TINY_CFG["encoder_layers"]
    with pytest.raises(ValueError, match=r"hq.pth: .*encoder part.*--beats-config"):
        convert_haaqinet(tmp_path / "hq.pth", tmp_path / "x")          # released size assumed
    run = subprocess.run([sys.executable, str(repo / "convert_weights.py"), "--haaqinet",
                          str(tmp_path / "hq.pth"), str(tmp_path / "cli"), "--beats-config",
                          str(tmp_path / "beats.pt")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "HAAQI-Net on BEATs 2 layers" in run.stdout
    reference = HAAQINet.load(tmp_path / "cli")

    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "dp.pth")
    parallel = HAAQINet.load(convert_haaqinet(tmp_path / "dp.pth", tmp_path / "dp",
                                              beats_config=TINY_CFG))
    for a, b in zip(*(jax_leaves(n.params) for n in (reference, parallel))):
        np.testing.assert_array_equal(a, b)

    bad = dict(sd)
    key = next(k for k in bad if k.startswith("beats_model.") and k.endswith("weight"))
    bad[key] = bad[key].clone().fill_(float("inf"))
    torch.save({"model": bad}, tmp_path / "inf.pth")
    with pytest.raises(ValueError, match=rf"{key[len('beats_model.'):]}.*non-finite"):
        convert_haaqinet(tmp_path / "inf.pth", tmp_path / "inf", beats_config=TINY_CFG)
    with pytest.raises(ValueError, match="is a BEATs checkpoint .*without --haaqinet"):
        convert_haaqinet(tmp_path / "beats.pt", tmp_path / "b", beats_config=TINY_CFG)


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


# The authors' student takes its teacher's config (12 layers: the deep-norm alpha) at tiny width.
STUDENT_TEACHER_CFG = dict(TINY_CFG, encoder_layers=12)


def test_authors_student_file_scores_as_their_code(tmp_path, kaldi):
    """Their distilled model (haaqi_net_distillBEATs.pth: front end, three layers each with its
    own position table, prediction heads, weighted-sum head) converts alone and scores as
    their code does, one clip at a time, with each token attending only to itself."""
    import subprocess
    import sys
    from pathlib import Path

    import jax.numpy as jnp

    from haaqi_jax.student import StudentConfig, StudentEncoder
    model = make_student(21, STUDENT_TEACHER_CFG)
    torch.save({"model": model.state_dict(), "epoch": 7}, tmp_path / "distill.pth")
    repo = Path(__file__).resolve().parents[1]
    cfg_file = tmp_path / "teacher_cfg.json"
    cfg_file.write_text(__import__("json").dumps(STUDENT_TEACHER_CFG))
    run = subprocess.run([sys.executable, str(repo / "convert_weights.py"), "--haaqinet",
                          str(tmp_path / "distill.pth"), str(tmp_path / "jax"),
                          "--beats-config", str(cfg_file)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "distilled HAAQI-Net: student of 3 layers" in run.stdout
    assert "encoder11.bias, encoder11.weight, encoder5.bias" in run.stdout
    net = HAAQINet.load(tmp_path / "jax")
    assert net.config.encoder_kind == "student"
    assert net.config.encoder_config["attention"] == "self_only"

    clips = _clips(4, [16000, 9000, 24000, 4100])
    levels = np.random.default_rng(8).uniform(0, 90, (len(clips), 8)).astype(np.float32)
    scores = net.predict(clips, SR, levels, batch_size=4, progress=False)
    ref = []
    with torch.no_grad():
        for clip, hl in zip(clips, levels):
            fbank = torch.from_numpy(torch_kaldi_fbank(kaldi, clip[None]))
            ref.append(float(model(fbank, torch.from_numpy(hl)[None])[1][0]))
    np.testing.assert_allclose(scores, ref, atol=TOL, rtol=0)
    assert np.std(ref) > 5 * TOL

    # The same weights attending over the sequence compute something else: the mode matters.
    fbank = jnp.asarray(torch_kaldi_fbank(kaldi, clips[0][None]))
    last = {}
    for attention in ("self_only", "sequence"):
        config = StudentConfig.from_dict(dict(net.config.encoder_config, attention=attention))
        last[attention] = np.asarray(StudentEncoder(config).apply(
            {"params": net.params["encoder"]}, fbank,
            method=StudentEncoder.encode_fbank).last_hidden_state)
    assert np.max(np.abs(last["self_only"] - last["sequence"])) > 0.1
    with pytest.raises(ValueError, match="attention must be one of"):
        StudentConfig(attention="token")


def test_authors_student_file_errors(tmp_path):
    model = make_student(22, STUDENT_TEACHER_CFG, num_layers=2)
    sd = model.state_dict()
    bad = dict(sd)
    del bad["encoder1.self_attn.relative_attention_bias.weight"]
    _expect_error(tmp_path, bad, "encoder1.self_attn.relative_attention_bias.weight")
    bad = dict(sd, **{"encoder0.self_attn.extra": sd["linear2.bias"]})
    _expect_error(tmp_path, bad, r"unexpected key\(s\) 'encoder0.self_attn.extra'")
    bad = dict(sd)
    bad["weights"] = torch.ones(3)
    del bad["layer_norm.1.weight"]
    _expect_error(tmp_path, bad, "layer_norm.1.weight")
