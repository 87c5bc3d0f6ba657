"""BEATs test helpers: seeded random weights in the official key layout, official-format
checkpoint files, and the speechbrain 1.1.2 reference model. Reused by other test files.

Import after tests/conftest.py has registered the bare torchaudio package (pytest does that).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Two layers, 64 dims: every architectural feature of the release (deep norm, gated relative
# bias with the released bucket settings, grouped even-width positional conv, a projection
# from a different patch-embedding width) at a size that runs in milliseconds.
TINY_CFG: dict[str, Any] = {
    "input_patch_size": 16, "embed_dim": 32, "conv_bias": False,
    "encoder_layers": 2, "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 128,
    "encoder_attention_heads": 4, "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 0.6, "layer_norm_first": False, "deep_norm": True,
    "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
    "encoder_layerdrop": 0.0, "dropout_input": 0.0,
    "conv_pos": 16, "conv_pos_groups": 4,
    "relative_position_embedding": True, "num_buckets": 320, "max_distance": 800,
    "gru_rel_pos": True, "finetuned_model": False, "predictor_dropout": 0.0,
    "predictor_class": 527,
}

# BEATs_iter3_plus_AS2M (written out here so the tests do not take it from the code under test).
RELEASED_CFG: dict[str, Any] = {
    **TINY_CFG, "embed_dim": 512, "encoder_layers": 12, "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12,
    "conv_pos": 128, "conv_pos_groups": 16, "encoder_layerdrop": 0.05,
}


def _official_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    e, c, f = cfg["embed_dim"], cfg["encoder_embed_dim"], cfg["encoder_ffn_embed_dim"]
    h, p, k = cfg["encoder_attention_heads"], cfg["input_patch_size"], cfg["conv_pos"]
    shapes = {
        "patch_embedding.weight": (e, 1, p, p),
        "layer_norm.weight": (e,), "layer_norm.bias": (e,),
        "post_extract_proj.weight": (c, e), "post_extract_proj.bias": (c,),
        "encoder.pos_conv.0.bias": (c,),
        "encoder.pos_conv.0.weight_g": (1, 1, k),
        "encoder.pos_conv.0.weight_v": (c, c // cfg["conv_pos_groups"], k),
        "encoder.layer_norm.weight": (c,), "encoder.layer_norm.bias": (c,),
    }
    for i in range(cfg["encoder_layers"]):
        a = f"encoder.layers.{i}.self_attn"
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{a}.{name}.weight"] = (c, c)
            shapes[f"{a}.{name}.bias"] = (c,)
        shapes[f"{a}.grep_a"] = (1, h, 1, 1)
        shapes[f"{a}.relative_attention_bias.weight"] = (cfg["num_buckets"], h)
        shapes[f"{a}.grep_linear.weight"] = (8, c // h)
        shapes[f"{a}.grep_linear.bias"] = (8,)
        layer = f"encoder.layers.{i}"
        for name in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[f"{layer}.{name}.weight"] = (c,)
            shapes[f"{layer}.{name}.bias"] = (c,)
        shapes[f"{layer}.fc1.weight"] = (f, c)
        shapes[f"{layer}.fc1.bias"] = (f,)
        shapes[f"{layer}.fc2.weight"] = (c, f)
        shapes[f"{layer}.fc2.bias"] = (c,)
    if cfg.get("finetuned_model"):
        shapes["predictor.weight"] = (cfg["predictor_class"], c)
        shapes["predictor.bias"] = (cfg["predictor_class"],)
    return shapes


def make_beats_state_dict(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Seeded random float32 weights in the official layout, every tensor perturbed.

    Matrices ~ N(0, 1/fan_in); LayerNorm scales 1 + 0.2 N, all biases 0.1 N, grep_a 1 + 0.3 N,
    weight_g around the released magnitude, relative-bias tables N(0, 1) (each layer's copy
    different, so the tests see which copy the reference uses). Includes `predictor.*` when
    cfg['finetuned_model'].
    """
    gen = torch.Generator().manual_seed(seed)
    normal = lambda shape: torch.randn(shape, generator=gen, dtype=torch.float32)
    state: dict[str, torch.Tensor] = {}
    for key, shape in _official_shapes(cfg).items():
        if key.endswith("grep_a"):
            value = 1.0 + 0.3 * normal(shape)
        elif key.endswith("weight_g"):
            value = 2.0 + 0.5 * normal(shape)
        elif key.endswith("relative_attention_bias.weight"):
            value = normal(shape)
        elif ("norm" in key) and key.endswith(".weight"):
            value = 1.0 + 0.2 * normal(shape)
        elif key.endswith(".bias"):
            value = 0.1 * normal(shape)
        else:  # weight matrices / kernels: unit-variance outputs
            fan_in = math.prod(shape[1:])
            value = normal(shape) / math.sqrt(fan_in)
        state[key] = value.contiguous()
    return state


def save_official_checkpoint(path: str | Path, cfg: dict[str, Any],
                             state_dict: dict[str, torch.Tensor], finetuned: bool = False) -> Path:
    """torch.save({'cfg', 'model'[, 'label_dict']}) like the released BEATs files."""
    cfg = dict(cfg, finetuned_model=bool(finetuned))
    if finetuned and "predictor.weight" not in state_dict:
        raise ValueError("finetuned=True needs predictor.* in the state dict "
                         "(make_beats_state_dict with cfg['finetuned_model']=True)")
    checkpoint: dict[str, Any] = {"cfg": cfg, "model": dict(state_dict)}
    if finetuned:
        checkpoint["label_dict"] = {i: f"/m/{i:05d}" for i in range(cfg["predictor_class"])}
    path = Path(path)
    torch.save(checkpoint, path)
    return path


def speechbrain_beats(ckpt_path: str | Path):
    """speechbrain 1.1.2's BEATs loaded from `ckpt_path`, eval mode, all hidden states."""
    from speechbrain.lobes.models.beats import BEATs as SpeechBrainBEATs

    model = SpeechBrainBEATs(ckp_path=str(ckpt_path), freeze=True, output_all_hiddens=True)
    return model.eval()


def speechbrain_hidden_states(model, wav: np.ndarray, lengths: np.ndarray | None = None,
                              fbank: np.ndarray | None = None):
    """Runs the speechbrain model; returns (hidden (L+1, B, T, C), probs or None, pad (B, T)).

    `fbank` (B, F, 128, normalised) replaces the model's own fbank so both sides can be fed
    the same features; the sample padding mask still comes from `lengths` via wav_lens.
    """
    wav_t = torch.from_numpy(np.asarray(wav, np.float32))
    n = wav_t.shape[1]
    lengths = np.full(wav_t.shape[0], n) if lengths is None else np.asarray(lengths)
    # (n - 0.5) / N keeps length_to_mask's `arange < wav_lens * N` exact at n valid samples.
    wav_lens = torch.from_numpy((lengths - 0.5) / n).to(torch.float64)
    original = model.preprocess
    if fbank is not None:
        fbank_t = torch.from_numpy(np.asarray(fbank, np.float32))
        model.preprocess = lambda *args, **kwargs: fbank_t
    try:
        with torch.no_grad():
            out = model(wav_t, wav_lens)
    finally:
        model.preprocess = original
    hidden = out[0].permute(0, 2, 1, 3).numpy()          # (L+1, T, B, C) -> (L+1, B, T, C)
    probs = out[1].numpy() if len(out) > 1 else None
    return hidden, probs


def reference_padding_masks(n_samples: int, lengths, n_frames: int, n_tokens: int):
    """speechbrain's forward_padding_mask applied twice: samples -> frames -> tokens (True=pad)."""
    from speechbrain.lobes.models.beats import BEATs as SpeechBrainBEATs

    pad = torch.arange(n_samples)[None, :] >= torch.as_tensor(np.asarray(lengths))[:, None]
    reduce = SpeechBrainBEATs.forward_padding_mask
    frames = reduce(None, torch.zeros(1, n_frames), pad)
    tokens = reduce(None, torch.zeros(1, n_tokens), frames)
    return frames.numpy(), tokens.numpy()


def torch_kaldi_fbank(kaldi, wav: np.ndarray) -> np.ndarray:
    """torchaudio's fbank of each row with BEATs settings, normalised: (B, F, 128)."""
    rows = []
    for row in np.asarray(wav, np.float32):
        feats = kaldi.fbank(torch.from_numpy(row)[None] * 2 ** 15, num_mel_bins=128,
                            sample_frequency=16000, frame_length=25, frame_shift=10)
        rows.append(((feats - 15.41663) / (2 * 6.55582)).numpy())
    return np.stack(rows)
