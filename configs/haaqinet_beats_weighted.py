"""HAAQI-Net, later version: learned weighted sum of BEATs layers 1..12 (each through its own
LayerNorm, softmax weights initialised uniform), otherwise as configs/haaqinet_beats.py.

    python train.py --config configs/haaqinet_beats_weighted.py \
        --set model.encoder_checkpoint=checkpoints/beats_iter3_plus_as2m
"""

import pathlib

from haaqi_jax.config import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("haaqinet_beats.py"))
    c.model.feature_mode = "weighted"
    c.model.feature_layers = tuple(range(1, 13))
    return c
