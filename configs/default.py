"""The demo job (`python train.py` with no arguments).

Builds (or reuses) the self-made demo dataset (800 clips of 2-4 s), computes the encoder's
features once per clip into a feature cache, trains the HAAQI-Net head on them with the paper's
loss and optimizer, evaluates every epoch and writes a report. With no pretrained weights the
encoder is "fbank_patches": BEATs' own normalised log-mel 16 x 16 patches in BEATs' token layout,
handed to the head as they are (README: why not a random BEATs). With converted BEATs weights
the same job trains on real BEATs features:

    python train.py --set model.encoder_checkpoint=checkpoints/beats_iter3_plus_as2m

(the checkpoint's own BEATs config then replaces `model.encoder_config`).
"""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0

    c.data = ConfigDict()
    c.data.manifest = config_dict.placeholder(str)  # None: build/reuse the demo dataset
    c.data.demo_dir = "data_cache/demo"
    c.data.demo_clips = 800
    c.data.demo_seed = 0
    c.data.demo_seconds = (2.0, 4.0)  # (min, max) clip length of the demo dataset
    c.data.demo_label_batch = 8  # clips per HAAQI labelling call
    c.data.train_split = "train"
    c.data.valid_split = "valid"
    c.data.eval_splits = ("valid", "test_seen", "test_unseen")
    # Distortion stages to leave out (e.g. ("resonance", "tilt_up")): their train and valid rows
    # form the split "held_out", scored in the report, for choosing models by how they do on
    # distortion types they never trained on without looking at test_unseen.
    c.data.hold_out = ()
    c.data.cache = True  # head-only training on cached encoder features
    c.data.cache_dir = "data_cache/features"  # keyed by the encoder (weights, settings, code)
    c.data.cache_dtype = "float16"  # "float16" | "float32" (bit-exact features)
    c.data.encode_batch_size = 8  # clips per encoder pass while building the cache
    c.data.valid_fraction = 0.2  # rows without a split: random train/valid division
    c.data.crop_seconds = config_dict.placeholder(float)  # waveform mode: random crops
    c.data.prefetch = 2  # batches read ahead by threads
    c.data.bucket_pool = 16  # batches per length-sorted pool (1 = no length grouping)

    c.model = ConfigDict()
    # The raw log-mel patches (no weights to download; see the module docstring). Ignored when
    # encoder_checkpoint is set: the checkpoint's kind and config win.
    c.model.encoder_kind = "fbank_patches"
    # clip_statistics: every token also carries per-band summaries of the whole clip (mean,
    # spread, frame-to-frame change), the clip-level view a BLSTM over 2-4 s learns slowly
    # from 480 training clips; test_unseen LCC 0.55 -> 0.79 (README).
    c.model.encoder_config = ConfigDict({"position_dim": 8, "spectrum_context": False,
                                         "clip_statistics": True})
    c.model.encoder_checkpoint = config_dict.placeholder(str)  # converted BEATs directory
    # A HAAQI-Net directory whose head starts the training (fine-tuning the released model, or
    # a run's best_model); its head settings must equal model.head's.
    c.model.head_checkpoint = config_dict.placeholder(str)
    c.model.feature_mode = "last"  # "last" | "weighted"
    c.model.feature_layers = (0,)  # hidden states summed by "weighted" (0 = encoder input)
    c.model.freeze_encoder = True
    # Compute dtype of the encoder's and the head's matmuls and activations: "float32" or
    # "bfloat16" (TPUs, recent GPUs). Parameters, optimizer state, the log-mel front end,
    # softmaxes, LayerNorm statistics, the LSTM state, scores and losses stay float32; the
    # feature cache is always encoded in float32, and a saved model loads in float32.
    c.model.dtype = "float32"
    # audiogram_scale 0.01: a head trained from scratch needs levels of order 1 (the released
    # model's raw dB HL saturated the BLSTM: unseen LCC 0.47 vs 0.63 on an 800-clip demo set).
    c.model.head = ConfigDict({"adapter_dim": 256, "lstm_hidden": 100, "lstm_layers": 1,
                               "lstm_dropout_rate": 0.0, "dense_dim": 256, "num_heads": 16,
                               "dropout_rate": 0.3, "audiogram_scale": 0.01,
                               "readout": "score"})

    c.loss = ConfigDict()
    c.loss.name = "haaqi_mse"
    c.loss.kwargs = ConfigDict({"clip_weight": 1.0, "frame_weight": 1.0})

    c.optimizer = ConfigDict()
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "cosine"  # the paper: constant; cosine settles the small demo set
    c.optimizer.warmup_steps = 0
    c.optimizer.grad_clip_norm = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999

    c.train = ConfigDict()
    c.train.batch_size = 8
    c.train.eval_batch_size = 16
    c.train.num_epochs = 25
    c.train.monitor = "loss"  # early stopping & best step follow: loss|lcc|srcc|mse|register_metric
    c.train.patience = 5  # epochs without a better train.monitor value; 0 = never stop early
    c.train.min_delta = 0.0  # in the units of train.monitor
    c.train.checkpoint_every_steps = 100
    c.train.log_every_steps = 10
    # > 0: validate, early-stop on, keep and report an exponential moving average of the
    # parameters (bias-corrected; ~1 / (1 - decay) steps, an epoch is 60) instead of the
    # parameters themselves. 0.99 and 0.995: LCC / SRCC within the seed spread, MSE about 10 %
    # lower (docs/demo_experiments.md).
    c.train.ema_decay = 0.0
    c.train.frozen_patterns = ()  # extra regexes on param paths, e.g. ("head/blstm/.*",)
    c.train.stop_after_steps = 0  # > 0: stop there without a report (tests of resumption)
    c.train.progress = True
    c.train.write_report = True

    c.report = ConfigDict()
    c.report.color_by = "split"  # "split" | "distortion" | "hearing_loss"
    c.report.num_example_predictions = 12
    # Registered metrics of your own (register_metric) beside LCC, SRCC and MSE in every row of
    # the report; a train.monitor metric of your own is there without being named.
    c.report.metrics = ()
    return c
