"""Package-level promises: importing haaqi_jax (any module but haaqi_jax.convert) never imports
torch, and the public names resolve."""

import subprocess
import sys

MODULES = [
    "haaqi_jax", "haaqi_jax.audiogram", "haaqi_jax.fbank", "haaqi_jax.beats", "haaqi_jax.head",
    "haaqi_jax.model", "haaqi_jax.student", "haaqi_jax.losses", "haaqi_jax.config",
    "haaqi_jax.distill", "haaqi_jax.predict", "haaqi_jax.evaluate", "haaqi_jax.cli",
    "haaqi_jax.haaqi.api", "haaqi_jax.haaqi.label", "haaqi_jax.haaqi.score_cli",
    "haaqi_jax.haaqi.placement",
    "haaqi_jax.data.manifest", "haaqi_jax.data.audio", "haaqi_jax.data.pipeline",
    "haaqi_jax.data.cache", "haaqi_jax.data.demo", "haaqi_jax.train.loop",
    "haaqi_jax.train.checkpoint",
]


def test_importing_haaqi_jax_does_not_import_torch():
    code = ("import importlib, sys\n"
            f"for m in {MODULES!r}: importlib.import_module(m)\n"
            "import haaqi_jax\n"
            "for name in haaqi_jax.__all__: getattr(haaqi_jax, name)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchaudio',"
            " 'speechbrain', 'clarity'))\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_cli_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "haaqi_jax.cli", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in ("score", "label", "demo-data", "predict", "evaluate"):
        assert name in result.stdout
