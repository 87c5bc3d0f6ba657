"""Config files, typed --set overrides, freezing and the JSON record."""

import json
from pathlib import Path

import pytest
from ml_collections import config_dict

from haaqi_jax import config as cfglib

REPO = Path(__file__).resolve().parents[1]


def _cfg():
    c = config_dict.ConfigDict()
    c.train = config_dict.ConfigDict({"num_epochs": 3, "lr": 1e-3, "cache": True, "name": "x",
                                      "patterns": ("a", "b")})
    c.model = config_dict.ConfigDict({"encoder_checkpoint": config_dict.placeholder(str)})
    return c


def test_overrides_parse_by_type():
    c = cfglib.apply_overrides(_cfg(), ["train.num_epochs=7", "train.lr=5e-4", "train.cache=false",
                                        "train.name=hello world", "train.patterns=('x',)",
                                        "model.encoder_checkpoint=/tmp/beats"])
    assert c.train.num_epochs == 7 and isinstance(c.train.num_epochs, int)
    assert c.train.lr == 5e-4 and c.train.cache is False and c.train.name == "hello world"
    assert c.train.patterns == ("x",) and c.model.encoder_checkpoint == "/tmp/beats"
    c = cfglib.apply_overrides(c, ["train.lr=1"])  # an int for a float field is fine
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float)
    # bare comma-separated items: they became one item "x,y" (a split name scored nowhere)
    for text, expected in (("x,y", ("x", "y")), ("x, y,", ("x", "y")), ("x", ("x",)),
                           ("'x,y'", ("x,y",)), ("1,2", (1, 2))):
        assert cfglib.apply_overrides(c, [f"train.patterns={text}"]).train.patterns == expected


def test_loss_keywords_can_be_added_by_override():
    # a loss's keywords are its own (checked by losses.get_loss), so `kwargs` sections are open
    c = cfglib.load_config_file(REPO / "configs" / "default.py")
    cfglib.apply_overrides(c, ["loss.name=haaqi_components", "loss.kwargs.score_weight=0.5",
                               "loss.kwargs.frame_weight=2"])
    assert cfglib.to_dict(c.loss.kwargs) == {"clip_weight": 1.0, "frame_weight": 2.0,
                                             "score_weight": 0.5}
    d = cfglib.load_config_file(REPO / "configs" / "distill.py")
    cfglib.apply_overrides(d, ["loss.kwargs.distill.kwargs.layer_weights=(1, 2, 3)"])
    assert d.loss.kwargs.distill.kwargs.layer_weights == (1, 2, 3)
    with pytest.raises(ValueError, match="unknown key 'score_weight' under loss"):
        cfglib.apply_overrides(c, ["loss.score_weight=1"])  # only under kwargs


def test_a_sub_loss_can_be_switched_by_override():
    """Comparing distillation terms needs no config file: a sub-loss spec inside
    loss.kwargs is replaced whole (the old term's keywords would not fit the new one)."""
    from haaqi_jax import losses
    for override in ['loss.kwargs.distill={"name": "mse"}', "loss.kwargs.distill=mse"]:
        d = cfglib.load_config_file(REPO / "configs" / "distill.py")
        cfglib.apply_overrides(d, [override])
        losses.check_loss_config(d.loss.name, cfglib.to_dict(d.loss.kwargs))
        assert losses._named(cfglib.to_dict(d.loss.kwargs)["distill"], "") == ("mse", {})
    d = cfglib.load_config_file(REPO / "configs" / "distill.py")
    cfglib.apply_overrides(d, ["loss.kwargs.distill.kwargs={}", "loss.kwargs.distill.name=l1"])
    losses.check_loss_config(d.loss.name, cfglib.to_dict(d.loss.kwargs))
    with pytest.raises(ValueError, match="train is a section"):   # outside kwargs: no
        cfglib.apply_overrides(_cfg(), ["train={}"])


@pytest.mark.parametrize("override,match", [
    ("train.num_epochs=2.5", r"train.num_epochs=.*int"),
    ("train.num_epochs=abc", r"train.num_epochs=.*int"),
    ("train.cache=maybe", r"train.cache=.*bool"),
    ("train.lr=fast", r"train.lr=.*float"),
    ("train.nmu_epochs=3", r"unknown key 'nmu_epochs' under train"),
    ("trian.num_epochs=3", r"unknown key 'trian' under <top>"),
    ("train=3", r"train is a section"),
    ("train.patterns=(x,y)", r"train.patterns='\(x,y\)': not a Python literal; quote the "
                             r"strings inside"),
    ("train.num_epochs", r"not of the form key=value"),
    ("train.patterns=x y", r"train.patterns='x y': separate the items with commas, e.g. "
                           r"train.patterns=x,y"),
])
def test_override_errors_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        cfglib.apply_overrides(_cfg(), [override])


def test_train_py_refuses_a_key_set_twice_naming_both_values(tmp_path, capsys):
    # On a long command line a second --set of one key is usually a slip; the run would
    # silently take the last.
    with pytest.raises(ValueError, match=r"--set train.num_epochs is given twice "
                                         r"\(train.num_epochs=2 and train.num_epochs=3\)"):
        cfglib.check_distinct_overrides(["train.num_epochs=2", "train.lr=0.1",
                                         " train.num_epochs =3"])
    # Distinct keys, a section and then a key inside it: fine.
    cfglib.check_distinct_overrides(["loss.kwargs={}", "loss.kwargs.beta=2", "train.lr=0.1"])
    # (apply_overrides itself applies edits in order, as Python callers compose lists.)
    assert cfglib.apply_overrides(_cfg(), ["train.num_epochs=2", "train.num_epochs=3"]
                                  ).train.num_epochs == 3
    import importlib.util
    spec = importlib.util.spec_from_file_location("_train_script", REPO / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    code = train_script.main(["--config", "configs/tiny.py", "--set", "seed=1", "--set",
                              "seed=2", "--workdir", str(tmp_path / "run"),
                              "--compilation-cache", "none"])
    assert code == 2
    assert "--set seed is given twice (seed=1 and seed=2)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_encoder_config_key_can_be_added_by_override_and_the_encoder_checks_it():
    """`--set model.encoder_config.KEY=...` may name any key of the encoder kind's config, not
    only those the config file lists; the encoder's config then refuses a misspelt key or a
    value of another type by name before the run (a string conv_pos used to pass the checks
    and fail deep in the model)."""
    from haaqi_jax.train import loop

    def random_beats(*overrides):
        c = cfglib.load_config_file(REPO / "configs" / "demo_random_beats.py")
        return cfglib.apply_overrides(c, list(overrides))

    c = random_beats("model.encoder_config.conv_pos=64",
                     "model.encoder_config.layer_norm_first=true",
                     "model.encoder_config.encoder_layerdrop=0")
    assert c.model.encoder_config.conv_pos == 64 and c.model.encoder_config.layer_norm_first is True
    loop.check_run_settings(c)
    built = loop.build_model_config(c).encoder_config
    assert built["conv_pos"] == 64 and built["layer_norm_first"] is True
    assert built["encoder_layerdrop"] == 0.0 and isinstance(built["encoder_layerdrop"], float)
    assert built["encoder_layers"] == 2                     # the file's own keys stay
    with pytest.raises(ValueError, match=r"unknown key conv_pso \(did you mean conv_pos\?\)"):
        loop.check_run_settings(random_beats("model.encoder_config.conv_pso=64"))
    for text, got in (("abc", "'abc'"), ("2.5", "2.5"), ("true", "True")):
        with pytest.raises(ValueError, match=rf"encoder_config.conv_pos: expected an int for "
                                             rf"encoder kind 'beats' \(default 128\), got {got}"):
            loop.check_run_settings(random_beats(f"model.encoder_config.conv_pos={text}"))
    with pytest.raises(ValueError, match=r"encoder_config.layer_norm_first: expected a bool"):
        loop.check_run_settings(random_beats("model.encoder_config.layer_norm_first=1"))
    # A key the file lists keeps its type check at the override itself.
    with pytest.raises(ValueError, match=r"model.encoder_config.encoder_layers=.*int"):
        random_beats("model.encoder_config.encoder_layers=2.5")
    # Elsewhere keys still cannot be added.
    with pytest.raises(ValueError, match=r"unknown key 'dropout' under model.head"):
        random_beats("model.head.dropout=0.1")


def test_freeze_and_json_roundtrip(tmp_path):
    c = _cfg()
    frozen = cfglib.freeze(c)
    with pytest.raises((AttributeError, TypeError, ValueError)):
        frozen.train.num_epochs = 1
    hash(frozen)
    path = cfglib.save_config(frozen, tmp_path / "run" / "config.json")
    data = json.loads(path.read_text())
    assert data["train"]["patterns"] == ["a", "b"] and data["model"]["encoder_checkpoint"] is None
    back = cfglib.load_config_json(path)
    assert back.train.num_epochs == 3


@pytest.mark.parametrize("name", ["default", "tiny", "haaqinet_beats", "haaqinet_beats_weighted",
                                  "demo_random_beats", "distill", "distill_l1_cosine"])
def test_shipped_configs_load(name):
    c = cfglib.load_config_file(REPO / "configs" / f"{name}.py")
    assert c.loss.name and c.optimizer.learning_rate > 0 and c.train.batch_size > 0
    cfglib.apply_overrides(c, ["train.num_epochs=1"])
    json.dumps(cfglib.to_dict(c))
    # The model config it describes builds (encoder kind and its config keys agree).
    from haaqi_jax.train import loop
    model_config = c.distill.teacher if "distill" in c else c
    loop.build_model_config(model_config)
    loop.check_run_settings(c)  # every key it sets is one a run reads (RUN_KEYS)


def test_a_misspelt_key_in_a_config_file_stops_the_run(tmp_path, capsys):
    # --set refuses unknown keys; a config file defines its own, so a misspelt one
    # (num_epoch) would leave the default of 25 epochs in force without a word.
    from haaqi_jax.train import loop

    (tmp_path / "mine.py").write_text(
        "import pathlib\n"
        "from haaqi_jax.config import load_config_file\n"
        f"DISTILL = pathlib.Path({str(REPO / 'configs' / 'distill.py')!r})\n"
        "def get_config():\n"
        "    c = load_config_file(DISTILL)\n"
        "    c.train.num_epoch = 3\n"
        "    c.distill.teacher.optimizer.learnig_rate = 1e-4\n"
        "    c.reprot = {}\n"
        "    return c\n")
    with pytest.raises(ValueError) as e:
        loop.check_run_settings(cfglib.load_config_file(tmp_path / "mine.py"))
    message = str(e.value)
    for named in ("train.num_epoch (did you mean train.num_epochs?)",
                  "distill.teacher.optimizer.learnig_rate (did you mean "
                  "distill.teacher.optimizer.learning_rate?)", "reprot (did you mean report?)"):
        assert named in message
    # train.py refuses it before anything is written (here the shrunk job's config).
    (tmp_path / "tiny.py").write_text(
        "import pathlib\n"
        "from haaqi_jax.config import load_config_file\n"
        f"TINY = pathlib.Path({str(REPO / 'configs' / 'tiny.py')!r})\n"
        "def get_config():\n"
        "    c = load_config_file(TINY)\n"
        "    c.data.demo_dir = 'unused'\n"
        "    c.train.batchsize = 2\n"
        "    return c\n")
    import importlib.util
    spec = importlib.util.spec_from_file_location("_train_script", REPO / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    code = train_script.main(["--config", str(tmp_path / "tiny.py"), "--workdir",
                              str(tmp_path / "run"), "--compilation-cache", "none"])
    assert code == 2
    assert "train.batchsize (did you mean train.batch_size?)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "unused").exists()


def test_a_config_without_a_section_is_named():
    from haaqi_jax.train import loop

    c = cfglib.load_config_file(REPO / "configs" / "tiny.py")
    del c["report"]
    with pytest.raises(ValueError, match="no section report"):
        loop.check_run_settings(c)
    c = cfglib.load_config_file(REPO / "configs" / "tiny.py")
    c.model.head.lstm_size = 8
    with pytest.raises(ValueError, match=r"model.head: .*unknown keys \['lstm_size'\]"):
        loop.build_model_config(c)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        cfglib.load_config_file(tmp_path / "nope.py")
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="get_config"):
        cfglib.load_config_file(tmp_path / "bad.py")


def test_save_run_config_refuses_a_workdir_of_another_run(tmp_path):
    from haaqi_jax.config import ConfigDict, config_differences, save_run_config
    cfg = ConfigDict({"data": {"demo_clips": 800, "prefetch": 2}, "model": {"layers": (1, 2)},
                      "train": {"num_epochs": 25, "progress": True}})
    save_run_config(cfg, tmp_path)                          # a fresh workdir
    other = ConfigDict(cfg.to_dict())
    other.data.demo_clips = 200
    save_run_config(other, tmp_path)                        # no checkpoint yet: nothing to mix
    (tmp_path / "checkpoints" / "100").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"data\.demo_clips: 200 -> 800.*--workdir"):
        save_run_config(cfg, tmp_path)
    resumed = ConfigDict(other.to_dict())
    resumed.train.num_epochs, resumed.train.progress, resumed.data.prefetch = 40, False, 4
    save_run_config(resumed, tmp_path)                      # loop-only keys may change
    # ... but not the epoch count under a cosine schedule, whose length it sets.
    cosine = ConfigDict({**resumed.to_dict(), "optimizer": {"schedule": "cosine"}})
    save_run_config(cosine, tmp_path / "cos")
    (tmp_path / "cos" / "checkpoints" / "10").mkdir(parents=True)
    cosine.train.num_epochs = 41
    with pytest.raises(ValueError, match=r"train\.num_epochs: 40 -> 41\) \(train.num_epochs "
                                         r"sets the length of the cosine learning-rate"):
        save_run_config(cosine, tmp_path / "cos")
    # Hosts other than the first check the same way but do not write.
    with pytest.raises(ValueError, match="demo_clips"):
        save_run_config(cfg, tmp_path, write=False)
    save_run_config(cfg, tmp_path / "other", write=False)
    assert not (tmp_path / "other" / "config.json").exists()
    assert config_differences({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == [
        "a.c: '<absent>' -> 2"]
    assert config_differences({"distill": {"teacher": {"train": {"num_epochs": 1}}}},
                              {"distill": {"teacher": {"train": {"num_epochs": 9}}}}) == []
    # A key added after a run was saved counts as the value that run used implicitly.
    assert config_differences({"model": {"head": {}}},
                              {"model": {"head": {"readout": "score"}}}) == []
    assert config_differences({"model": {"head": {}}},
                              {"model": {"head": {"readout": "haaqi_components"}}}) == [
        "model.head.readout: 'score' -> 'haaqi_components'"]


def test_a_resume_takes_another_spelling_of_the_same_path(tmp_path, monkeypatch):
    """A path given relative, absolute or with a trailing slash is one setting on a resume
    (it used to be refused as another config); another path is still refused by name."""
    from haaqi_jax.config import ConfigDict, config_differences, save_run_config
    monkeypatch.chdir(tmp_path)
    cfg = ConfigDict({"data": {"manifest": "data/manifest.jsonl", "cache_dir": "cache"},
                      "distill": {"teacher": {"data": {"cache_dir": "cache"}}}})
    save_run_config(cfg, tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "10").mkdir(parents=True)
    same = ConfigDict({"data": {"manifest": str(tmp_path / "data" / "manifest.jsonl"),
                                "cache_dir": "./cache/"},
                       "distill": {"teacher": {"data": {"cache_dir": str(tmp_path / "cache")}}}})
    save_run_config(same, tmp_path / "run")
    other = ConfigDict(same.to_dict())
    other.data.manifest = "elsewhere/manifest.jsonl"
    with pytest.raises(ValueError, match=r"data\.manifest: .* -> 'elsewhere/manifest\.jsonl'"):
        save_run_config(other, tmp_path / "run")
    assert config_differences({"model": {"head_checkpoint": None}},
                              {"model": {"head_checkpoint": "x"}}) == [
        "model.head_checkpoint: None -> 'x'"]
    assert config_differences({"data": {"demo_clips": "8"}}, {"data": {"demo_clips": "./8"}})


def test_a_config_file_imports_a_module_beside_it(tmp_path, monkeypatch):
    """As a Python script does: a config file's `import my_losses` finds my_losses.py in the
    config's own folder (a user's losses kept beside their config), whatever the current
    folder, and sys.path is left as it was."""
    import sys
    (tmp_path / "beside_config_losses.py").write_text("SCALE = 3.0\n")
    (tmp_path / "mine.py").write_text(
        "import beside_config_losses\n"
        "from ml_collections import ConfigDict\n"
        "def get_config():\n"
        "    return ConfigDict({'scale': beside_config_losses.SCALE})\n")
    monkeypatch.chdir(REPO)
    monkeypatch.delitem(sys.modules, "beside_config_losses", raising=False)
    path_before = list(sys.path)
    assert cfglib.load_config_file(tmp_path / "mine.py").scale == 3.0
    assert sys.path == path_before


def test_a_new_loss_keyword_takes_true_and_false_as_bools():
    """--set spells a bool true/false (as for any bool key); a keyword the config does not hold
    yet (a user loss's flag) used to become the string "false", which is truthy."""
    c = cfglib.load_config_file(REPO / "configs" / "distill_l1_cosine.py")
    for i, (text, value) in enumerate((("false", False), ("true", True), ("False", False),
                                       ("off", "off"), ("0", 0), ("'false'", "false"))):
        cfglib.apply_overrides(c, [f"loss.kwargs.distill.kwargs.new_flag_{i}={text}"])
        got = c.loss.kwargs.distill.kwargs[f"new_flag_{i}"]
        assert got == value and type(got) is type(value), (text, got)


@pytest.mark.parametrize("override", ["data.manifest=", "model.encoder_checkpoint= ", "seed=",
                                      "data.eval_splits=", "loss.kwargs.new_flag="])
def test_an_empty_value_is_refused(override):
    """`--set data.manifest=$MANIFEST` with the variable unset gave the empty string, which a
    run reads as no manifest: it trained on the demo dataset without a word."""
    c = cfglib.load_config_file(REPO / "configs" / "default.py")
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"config override {key}=.*no value.*None"):
        cfglib.apply_overrides(c, [override])


def test_none_clears_only_an_optional_field():
    """None clears a placeholder field (or a loss keyword); a bool / int / str / tuple field
    given None used to take it (data.cache=None ran on waveforms; a later data.cache=false
    then stored the truthy string "false")."""
    c = cfglib.load_config_file(REPO / "configs" / "default.py")
    cfglib.apply_overrides(c, ["data.manifest=m.jsonl", "data.manifest=None",
                               "data.crop_seconds=null", "loss.kwargs.clip_weight=None"])
    assert c.data.manifest is None and c.data.crop_seconds is None
    assert c.loss.kwargs.clip_weight is None
    for override in ("data.cache=None", "seed=none", "train.batch_size=null",
                     "model.encoder_kind=None", "data.eval_splits=None"):
        key = override.split("=")[0]
        with pytest.raises(ValueError, match=rf"config override {key}=.*not optional.*type"):
            cfglib.apply_overrides(c, [override])
    assert c.data.cache is True
    # a config file's None for a count is still refused by name before the run
    from haaqi_jax.train import loop
    for key, message in (("batch_size", "a whole number >= 1"), ("min_delta", "a number >= 0")):
        d = cfglib.load_config_file(REPO / "configs" / "tiny.py")
        d.train[key] = None
        with pytest.raises(ValueError, match=rf"train.{key} must be {message}, got None"):
            loop.check_run_settings(d)


def test_a_quoted_string_value_is_the_string_inside():
    """`--set 'model.head.readout="haaqi_components"'` (quoted as a tuple's items are, or as
    `haaqi-jax compare`'s legend writes a setting) kept the quotes: a path that is not there,
    a split that matches no row."""
    c = cfglib.load_config_file(REPO / "configs" / "default.py")
    cfglib.apply_overrides(c, ['model.head.readout="haaqi_components"',
                               "data.manifest='my data/m.jsonl'", "data.valid_split= 'dev' ",
                               "data.demo_dir=it's", 'data.cache_dir="a"b'])
    assert c.model.head.readout == "haaqi_components" and c.data.manifest == "my data/m.jsonl"
    assert c.data.valid_split == "dev"
    assert c.data.demo_dir == "it's" and c.data.cache_dir == '"a"b'   # not a quoted string


def test_an_override_of_a_misspelt_key_or_under_a_value_says_so():
    """--set named the known keys but, unlike a config file's check, no nearest one; and a key
    under a value (train.batch_size.x) was 'unknown key batch_size' with batch_size listed."""
    c = cfglib.load_config_file(REPO / "configs" / "distill.py")
    for override, match in (
            ("train.nmu_epochs=3", r"unknown key 'nmu_epochs' under train \(did you mean "
                                   r"train.num_epochs\?\)"),
            ("distill.teacher.optimizer.learnig_rate=1", r"did you mean "
                                                          r"distill.teacher.optimizer.learning_rate"),
            ("trian.num_epochs=3", r"unknown key 'trian' under <top> \(did you mean train\?\)"),
            ("train.batch_size.x=3", r"'train.batch_size.x': train.batch_size is not a section "
                                     r"\(it is 8\)")):
        with pytest.raises(ValueError, match=match):
            cfglib.apply_overrides(c, [override])
    cfglib.apply_overrides(c, ["loss.kwargs.distill=mse"])
    with pytest.raises(ValueError, match=r"loss.kwargs.distill is not a section \(it is 'mse'\)"):
        cfglib.apply_overrides(c, ["loss.kwargs.distill.kwargs.x=1"])


@pytest.mark.parametrize("name,override", [
    ("default", "loss.kwargs=mse"), ("default", "loss.kwargs=[1, 2]"),
    ("distill", "loss.kwargs.distill.kwargs=mse")])
def test_a_loss_keywords_section_takes_only_a_dict(name, override):
    """A `kwargs` section replaced by a name or a list failed later as 'dictionary update
    sequence element #0 has length 1' (or a TypeError traceback), naming no key."""
    c = cfglib.load_config_file(REPO / "configs" / f"{name}.py")
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"config override {key}=.*keywords.*dict"):
        cfglib.apply_overrides(c, [override])
    cfglib.apply_overrides(c, [f"{key}={{}}", f"{key}=None"])   # still fine


def test_a_tuple_override_keeps_the_type_of_the_items():
    """model.feature_layers=1.5 ran on layer 1 (int(1.5)). The items of a non-empty tuple of
    numbers keep their type."""
    c = cfglib.load_config_file(REPO / "configs" / "distill.py")
    for override, match in (("model.feature_layers=1.5", r"model.feature_layers='1.5': "
                                                         r"expected a tuple of int"),
                            ("distill.target_layers=6,a", r"tuple of int"),
                            ("data.demo_seconds=(1, 'x')", r"tuple of float")):
        with pytest.raises(ValueError, match=match):
            cfglib.apply_overrides(cfglib.load_config_file(REPO / "configs" / "default.py")
                                   if override.startswith(("model", "data")) else c,
                                   [override])
    d = cfglib.load_config_file(REPO / "configs" / "default.py")
    cfglib.apply_overrides(d, ["data.demo_seconds=1,3", "model.feature_layers=2,3",
                               "data.hold_out=resonance", "train.frozen_patterns=()"])
    assert d.data.demo_seconds == (1.0, 3.0) and isinstance(d.data.demo_seconds[0], float)
    assert d.model.feature_layers == (2, 3) and d.data.hold_out == ("resonance",)


def test_a_loss_keyword_takes_any_number_and_true_false_after_none():
    """A loss's keywords are typed by the loss, not by the value they held: (1, 2, 3) ->
    (0.5, 1, 1) and 1 -> 0.5 were refused as 'expected int'; a keyword cleared by None then
    took false as the truthy string "false" (as a new keyword used to)."""
    c = cfglib.load_config_file(REPO / "configs" / "distill.py")
    cfglib.apply_overrides(c, ["loss.kwargs.distill.kwargs.layer_weights=(1, 2, 3)",
                               "loss.kwargs.distill.kwargs.layer_weights=(0.5, 1, 1)",
                               "loss.kwargs.distill.kwargs.w=1", "loss.kwargs.distill.kwargs.w=0.5",
                               "loss.kwargs.distill.kwargs.flag=None",
                               "loss.kwargs.distill.kwargs.flag=false"])
    kw = c.loss.kwargs.distill.kwargs
    assert kw.layer_weights == (0.5, 1, 1) and kw.w == 0.5 and kw.flag is False
    cfglib.apply_overrides(c, ["loss.kwargs.distill.kwargs.cosine_weight=2"])
    assert kw.cosine_weight == 2.0 and isinstance(kw.cosine_weight, float)


@pytest.mark.parametrize("bad", [1, 1.0, -0.1, True, "0.5", None, float("nan")])
def test_every_fraction_setting_refuses_what_is_not_a_number_in_0_1_by_name(bad):
    """Decays, dropout rates and held-back fractions share one check and one message."""
    from haaqi_jax.head import HeadConfig
    from haaqi_jax.train import state

    for build, key in [(lambda v: cfglib.check_fraction(v, "a.b"), r"a\.b"),
                       (lambda v: HeadConfig(dropout_rate=v), "HeadConfig: dropout_rate"),
                       (lambda v: HeadConfig(lstm_dropout_rate=v), "lstm_dropout_rate"),
                       (lambda v: state.check_ema_decay(v), r"train\.ema_decay")]:
        with pytest.raises(ValueError, match=key + r" must be a number in \[0, 1\)"):
            build(bad)
    assert cfglib.check_fraction(0, "a.b") == 0.0 and cfglib.check_fraction(0.999, "a") == 0.999


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -0.5])
def test_a_min_delta_that_no_epoch_could_beat_is_refused(bad):
    """train.min_delta from a config file: an infinite one would keep the first epoch best
    forever (every later epoch a bad one), a NaN compares false with everything."""
    from haaqi_jax.train import loop
    d = cfglib.load_config_file(REPO / "configs" / "tiny.py")
    d.train.min_delta = bad
    with pytest.raises(ValueError, match=r"train.min_delta must be a number >= 0, got"):
        loop.check_run_settings(d)


def test_a_fraction_comes_back_a_float_and_its_note_is_in_the_message():
    """check_fraction returns float(value) (an int 0 from a config file is 0.0), and its note
    (what 0 means) is in the message, as train.ema_decay's."""
    from haaqi_jax.train import state
    for value in (0, 0.5):
        assert type(cfglib.check_fraction(value, "a.b")) is float
    assert type(state.check_ema_decay(0)) is float and state.check_ema_decay(0) == 0.0
    with pytest.raises(ValueError, match=r"^a\.b must be a number in \[0, 1\) \(0 = none\), "
                                         r"got 2$"):
        cfglib.check_fraction(2, "a.b", "0 = none")
    with pytest.raises(ValueError, match=r"^a\.b must be a number in \[0, 1\), got 2$"):
        cfglib.check_fraction(2, "a.b")
    with pytest.raises(ValueError, match=r"^train\.ema_decay must be a number in \[0, 1\) "
                                         r"\(0 = no moving average of the parameters\), got 1$"):
        state.check_ema_decay(1)
