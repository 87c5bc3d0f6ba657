"""The demo job with the encoder it replaced: a small frozen, randomly initialised BEATs
(2 layers, 256 wide) instead of the raw log-mel patches. Kept to reproduce the README's encoder
comparison:

    python train.py --config configs/demo_random_beats.py
"""

import pathlib

from ml_collections import ConfigDict

from haaqi_jax.config import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("default.py"))
    c.model.encoder_kind = "beats"
    c.model.encoder_config = ConfigDict({
        "encoder_layers": 2, "encoder_embed_dim": 256, "encoder_ffn_embed_dim": 512,
        "encoder_attention_heads": 4, "embed_dim": 256, "conv_pos_groups": 16})
    c.model.feature_layers = (1, 2)
    return c
