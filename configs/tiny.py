"""The default job shrunk for tests and smoke runs: the same encoder (log-mel patches), a small
head, a few short demo clips, 2 epochs.

    python train.py --config configs/tiny.py --workdir /tmp/tiny
"""

import pathlib

from ml_collections import ConfigDict

from haaqi_jax.config import load_config_file


def get_config():
    c = load_config_file(pathlib.Path(__file__).with_name("default.py"))
    c.data.demo_dir = "data_cache/demo_tiny"
    c.data.demo_clips = 24
    c.model.head = ConfigDict({"adapter_dim": 16, "lstm_hidden": 8, "lstm_layers": 1,
                               "lstm_dropout_rate": 0.0, "dense_dim": 16, "num_heads": 4,
                               "dropout_rate": 0.3, "audiogram_scale": 0.01,
                               "readout": c.model.head.readout})
    c.train.batch_size = 4
    c.train.eval_batch_size = 4
    c.train.num_epochs = 2
    c.train.checkpoint_every_steps = 2
    c.train.log_every_steps = 1
    c.train.progress = False
    c.report.num_example_predictions = 4
    return c
