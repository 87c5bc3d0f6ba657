"""PyTorch reference for the HAAQI-Net head, built here from standard torch layers.

The layer names and the forward pass follow the authors' released model (github
dyahayumgw/HAAQI-Net, `HAAQINet` / `BLSTM_frame_sig_att`): `blstm`, `linear0` (adapter),
`linear1`, `haaqiAtt_layer` (nn.MultiheadAttention, sequence-first), `haaqiframe_score`, and in
the weighted variant `weights` + `layer_norm.{i}`. Like the released code it scores one
unpadded clip at a time (no masks), which is the truth a padded JAX batch must reproduce.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TorchHAAQINetHead(nn.Module):
    def __init__(self, feature_dim: int = 768, num_weighted_layers: int = 0,
                 adapter_dim: int = 256, audiogram_dim: int = 8, lstm_hidden: int = 100,
                 num_heads: int = 16, score_outputs: int = 1, lstm_layers: int = 1,
                 lstm_dropout: float = 0.0):
        super().__init__()
        self.blstm = nn.LSTM(adapter_dim + audiogram_dim, lstm_hidden, num_layers=lstm_layers,
                             dropout=lstm_dropout, bidirectional=True, batch_first=True)
        self.linear0 = nn.Linear(feature_dim, adapter_dim)
        self.linear1 = nn.Linear(2 * lstm_hidden, adapter_dim)
        self.dropout = nn.Dropout(0.3)
        self.haaqiAtt_layer = nn.MultiheadAttention(adapter_dim, num_heads=num_heads)
        # score_outputs 2: HAAQI's (nonlinear, linear) parts per frame (not in the release).
        self.haaqiframe_score = nn.Linear(adapter_dim, score_outputs)
        self.num_weighted_layers = num_weighted_layers
        if num_weighted_layers:
            self.weights = nn.Parameter(torch.ones(num_weighted_layers))
            self.layer_norm = nn.Sequential(
                *[nn.LayerNorm(feature_dim) for _ in range(num_weighted_layers)])

    def forward(self, features, hl):
        """features: (B, T, C) or a list of L such tensors; hl: (B, 8).
        Returns frame scores (B, T) and clip scores (B,)."""
        if self.num_weighted_layers:
            w = torch.softmax(self.weights, -1)
            x = sum(norm(f) * w[i] for i, (f, norm) in enumerate(zip(features, self.layer_norm)))
        else:
            x = features
        t = x.shape[1]
        x = torch.cat([self.linear0(x), hl[:, None, :].repeat(1, t, 1)], dim=2)
        x, _ = self.blstm(x)
        x = self.dropout(torch.relu(self.linear1(x))).transpose(0, 1)
        x, _ = self.haaqiAtt_layer(x, x, x)
        frame = torch.sigmoid(self.haaqiframe_score(x.transpose(0, 1)))
        if frame.shape[-1] == 1:
            frame = frame[..., 0]
        return frame, frame.mean(dim=1)


def make_head(seed: int, *, feature_dim: int = 768, num_weighted_layers: int = 0,
              **kwargs) -> TorchHAAQINetHead:
    """A head in eval mode with seeded random weights (biases and layer weights non-trivial)."""
    torch.manual_seed(seed)
    head = TorchHAAQINetHead(feature_dim, num_weighted_layers, **kwargs)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("bias") or name == "weights":
                p.copy_(0.1 * torch.randn_like(p))
            elif name.startswith("layer_norm"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return head.eval()


def torch_head_scores(head: TorchHAAQINetHead, features, audiogram):
    """Scores ONE clip at a time (as released). features: list of (T_b, C) or (L, T_b, C)
    numpy arrays; audiogram (B, 8). Returns lists of frame scores (T_b,) and clip scores
    (with score_outputs 2: frame parts (T_b, 2) and clip parts (B, 2))."""
    frames, clips = [], []
    with torch.no_grad():
        for f, hl in zip(features, np.asarray(audiogram, np.float32)):
            f = torch.from_numpy(np.asarray(f, np.float32))
            x = list(f[:, None]) if head.num_weighted_layers else f[None]
            frame, clip = head(x, torch.from_numpy(hl)[None])
            frames.append(frame[0].numpy())
            clips.append(clip[0].numpy())
    return frames, np.asarray(clips)


class TorchHAAQINetStudent(nn.Module):
    """The authors' distilled HAAQI-Net in their key layout (`HAAQINetStudent`): BEATs front end
    (`patch_embedding`, `beats_layer_norm`, `linear2`), encoder layers `encoder{i}` (speechbrain
    1.1.2's BEATs layer, each with its own position table), prediction heads `encoder5/8/11`,
    and the weighted-sum head. Like their code it hands the layers batch-first tensors where
    they expect time first, so each token attends only to itself.
    """

    def __init__(self, cfg: dict, num_layers: int = 3, **head_kwargs):
        super().__init__()
        from speechbrain.lobes.models.beats import TransformerSentenceEncoderLayer
        c, e, p = cfg["encoder_embed_dim"], cfg["embed_dim"], cfg["input_patch_size"]
        self.patch_embedding = nn.Conv2d(1, e, kernel_size=p, stride=p, bias=cfg["conv_bias"])
        self.beats_layer_norm = nn.LayerNorm(e)
        self.linear2 = nn.Linear(e, c)
        for i in range(num_layers):
            setattr(self, f"encoder{i}", TransformerSentenceEncoderLayer(
                embedding_dim=c, ffn_embedding_dim=cfg["encoder_ffn_embed_dim"],
                num_attention_heads=cfg["encoder_attention_heads"], dropout=0.0,
                attention_dropout=0.0, activation_dropout=0.0,
                activation_fn=cfg["activation_fn"], layer_norm_first=False, deep_norm=True,
                has_relative_attention_bias=True, num_buckets=cfg["num_buckets"],
                max_distance=cfg["max_distance"], gru_rel_pos=True,
                encoder_layers=cfg["encoder_layers"]))
        for i in (5, 8, 11):
            setattr(self, f"encoder{i}", nn.Linear(c, c))
        self.num_layers = num_layers
        self.head = TorchHAAQINetHead(c, num_weighted_layers=num_layers, **head_kwargs)

    def state_dict(self, *args, **kwargs):
        """Their flat layout: the head's keys at the top level."""
        flat = super().state_dict(*args, **kwargs)
        return {k[len("head."):] if k.startswith("head.") else k: v for k, v in flat.items()}

    def forward(self, fbank, hl):
        """fbank (1, F, 128) normalised, hl (1, 8) -> frame scores (1, T), clip score (1,)."""
        x = self.patch_embedding(fbank[:, None])
        x = self.linear2(self.beats_layer_norm(x.reshape(x.shape[0], x.shape[1], -1)
                                                .transpose(1, 2)))
        layers = []
        for i in range(self.num_layers):
            x = getattr(self, f"encoder{i}")(x)[0]    # (B, T, C) read as (time B, batch T, C)
            layers.append(x)
        return self.head(layers, hl)


def make_student(seed: int, cfg: dict, num_layers: int = 3) -> TorchHAAQINetStudent:
    """The authors' distilled model with seeded random weights, eval mode; position tables and
    gates non-trivial so that a wrong bucket or gate shows."""
    torch.manual_seed(seed)
    model = TorchHAAQINetStudent(cfg, num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("head."):
                continue
            if name.endswith("bias") or "relative_attention_bias" in name or "grep_a" in name:
                p.copy_(0.1 * torch.randn_like(p))
            elif "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    fresh = make_head(seed + 1, feature_dim=cfg["encoder_embed_dim"],
                      num_weighted_layers=model.num_layers)
    model.head.load_state_dict(fresh.state_dict())
    return model.eval()
