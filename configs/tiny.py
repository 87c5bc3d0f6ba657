"""The default job shrunk for tests and smoke runs: a 2-layer, 64-dim random BEATs, a small
head, a few short demo clips, 2 epochs.

    python train.py --config configs/tiny.py --workdir /tmp/tiny
"""

import importlib.util
import pathlib

from ml_collections import ConfigDict


def get_config():
    spec = importlib.util.spec_from_file_location(
        "_haaqi_default_config", pathlib.Path(__file__).with_name("default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.data.demo_dir = "data_cache/demo_tiny"
    c.data.demo_clips = 24
    c.model.encoder_config = ConfigDict({
        "encoder_layers": 2, "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 128,
        "encoder_attention_heads": 4, "embed_dim": 64, "conv_pos": 16, "conv_pos_groups": 4,
        "num_buckets": 32, "max_distance": 64})
    c.model.feature_layers = (1, 2)
    c.model.head = ConfigDict({"adapter_dim": 16, "lstm_hidden": 8, "dense_dim": 16,
                               "num_heads": 4, "dropout_rate": 0.3})
    c.train.batch_size = 4
    c.train.eval_batch_size = 4
    c.train.num_epochs = 2
    c.train.checkpoint_every_steps = 2
    c.train.log_every_steps = 1
    c.train.progress = False
    c.report.num_example_predictions = 4
    return c
