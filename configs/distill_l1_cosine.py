"""distillBEATs with the fixed DistilHuBERT loss: HAAQI loss + sum over target layers of
(L1 - log sigmoid(cos)), otherwise as configs/distill.py.

    python train.py --config configs/distill_l1_cosine.py
"""

import pathlib

from ml_collections import ConfigDict

from haaqi_jax.config import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("distill.py"))
    c.loss.name = "distill_weighted"
    c.loss.kwargs = ConfigDict({
        "haaqi": {"name": "haaqi_mse", "kwargs": {"clip_weight": 1.0, "frame_weight": 1.0}},
        "distill": {"name": "l1_cosine", "kwargs": {"cosine_weight": 1.0}},
        "haaqi_weight": 1.0, "distill_weight": 1.0})
    return c
