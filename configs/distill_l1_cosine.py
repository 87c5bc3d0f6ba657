"""distillBEATs with the fixed DistilHuBERT loss: HAAQI loss + sum over target layers of
(L1 - log sigmoid(cos)), otherwise as configs/distill.py.

    python train.py --config configs/distill_l1_cosine.py
"""

import importlib.util
import pathlib

from ml_collections import ConfigDict


def get_config():
    spec = importlib.util.spec_from_file_location(
        "_haaqi_distill_config", pathlib.Path(__file__).with_name("distill.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.loss.name = "distill_weighted"
    c.loss.kwargs = ConfigDict({
        "haaqi": {"name": "haaqi_mse", "kwargs": {"clip_weight": 1.0, "frame_weight": 1.0}},
        "distill": {"name": "l1_cosine", "kwargs": {"cosine_weight": 1.0}},
        "haaqi_weight": 1.0, "distill_weight": 1.0})
    return c
