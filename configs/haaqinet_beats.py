"""HAAQI-Net as in the paper: real (converted) BEATs_iter3+ AS2M, last layer, frozen;
Adam 1e-4, batch 1, at most 10 epochs, early stopping with patience 3 on the validation loss.

    python train.py --config configs/haaqinet_beats.py \
        --set model.encoder_checkpoint=checkpoints/beats_iter3_plus_as2m \
        --set data.manifest=data/cad1/manifest.jsonl

Without data.manifest the demo dataset is used.
"""

import pathlib

from ml_collections import ConfigDict, config_dict

from haaqi_jax.config import load_config_file


def _default():
    return load_config_file(pathlib.Path(__file__).with_name("default.py"))


def get_config():
    c = _default()
    c.model.encoder_kind = "beats"
    c.model.encoder_config = ConfigDict()  # no overrides: the released (checkpoint's) config
    c.model.encoder_checkpoint = config_dict.placeholder(str)
    c.model.feature_mode = "last"
    c.model.feature_layers = tuple(range(1, 13))
    c.model.head.audiogram_scale = 1.0  # the released head: raw dB HL
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "constant"
    c.train.batch_size = 1
    c.train.eval_batch_size = 8
    c.train.num_epochs = 10
    c.train.patience = 3
    c.train.checkpoint_every_steps = 500
    c.train.log_every_steps = 50
    c.data.encode_batch_size = 4
    return c
