"""HAAQI-Net, later version: learned weighted sum of BEATs layers 1..12 (each through its own
LayerNorm, softmax weights initialised uniform), otherwise as configs/haaqinet_beats.py.

    python train.py --config configs/haaqinet_beats_weighted.py \
        --set model.encoder_checkpoint=checkpoints/beats_iter3_plus_as2m
"""

import importlib.util
import pathlib


def get_config():
    spec = importlib.util.spec_from_file_location(
        "_haaqi_beats_config", pathlib.Path(__file__).with_name("haaqinet_beats.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.feature_mode = "weighted"
    c.model.feature_layers = tuple(range(1, 13))
    return c
