"""Package-level promises: importing haaqi_jax (any module but haaqi_jax.convert) never imports
torch, and the public names resolve; the wheel and the sdist hold what they must (every module,
every source file, the licences), and the metadata is right."""

import ast
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

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


def test_cli_version_is_the_package_version():
    result = subprocess.run([sys.executable, "-m", "haaqi_jax.cli", "--version"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["haaqi-jax", _source_version()]


def test_package_declares_its_type_hints():
    # PEP 561: type checkers read an installed package's annotations only when it has py.typed
    # (setuptools >= 69 packs it; test_wheel_holds_every_file_of_the_package checks the wheel).
    assert (ROOT / "haaqi_jax" / "py.typed").is_file()


def test_cli_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "haaqi_jax.cli", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in ("score", "label", "demo-data", "predict", "evaluate"):
        assert name in result.stdout


# --- what a user installs: the wheel and the sdist, built here without the network ----------

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: Folders and files a checkout may hold that are no part of the source (.gitignore's).
NOT_SOURCE = {".git", "runs", "data_cache", "build", "dist", ".pytest_cache", ".hypothesis",
              "__pycache__", ".whl", ".gl", ".venv"}


def _source_files(root: Path = ROOT) -> list[str]:
    """The project's files, relative to `root`: git's list (tracked, and untracked but not
    ignored) in a checkout; every file outside the build outputs otherwise (an unpacked sdist,
    or a checkout git will not read, e.g. one owned by another user). Never the files of a
    virtual environment (a folder holding pyvenv.cfg: CI makes .venv inside the checkout)."""
    listed = None
    if (root / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=root, capture_output=True)
        if out.returncode == 0:
            listed = [p for p in out.stdout.decode().split("\0") if p]
    if listed is None:
        listed = [str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name not in ("PKG-INFO", "setup.cfg")]
    venvs: dict[Path, bool] = {}

    def in_venv(path: Path) -> bool:
        for folder in path.parents:
            if folder not in venvs:
                venvs[folder] = folder != Path(".") and (root / folder / "pyvenv.cfg").is_file()
            if venvs[folder]:
                return True
        return False

    return sorted(name for name in listed if (root / name).is_file()
                  and not any(part in NOT_SOURCE or part.endswith(".egg-info")
                              for part in Path(name).parts)
                  and not in_venv(Path(name)))


@pytest.mark.parametrize("git", [True, False])
def test_source_files_leave_out_build_outputs_and_virtual_environments(tmp_path, git):
    """CI makes its venv (.venv, not ignored by git) inside the checkout: listing it as source
    copied torch into the build and failed the sdist test on every file of it."""
    if git and not shutil.which("git"):
        pytest.skip("no git")
    for name in ("pkg/__init__.py", "README.md", ".venv/pyvenv.cfg", ".venv/lib/site.py",
                 "myenv/pyvenv.cfg", "myenv/lib/x.py", "build/lib/pkg/__init__.py",
                 "pkg/__pycache__/m.pyc", "pkg.egg-info/PKG-INFO"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    if git:
        subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert _source_files(tmp_path) == ["README.md", "pkg/__init__.py"]


def _source_version() -> str:
    """haaqi_jax.__version__ as written in haaqi_jax/__init__.py (read, not imported)."""
    tree = ast.parse((ROOT / "haaqi_jax" / "__init__.py").read_text())
    return next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__version__"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A wheel and an sdist built from a copy of the source files (so the checkout gets no
    build/ or egg-info, and files git does not know cannot slip in) by the installed
    setuptools, without build isolation or the network: {"wheel": Path, "sdist": Path}."""
    import setuptools
    need = next(Requirement(r) for r in PYPROJECT["build-system"]["requires"]
                if Requirement(r).name == "setuptools")
    assert need.specifier.contains(setuptools.__version__, prereleases=True), (
        f"the installed setuptools {setuptools.__version__} is not {need}: pip install -e "
        "'.[test]' installs one that is")
    root = tmp_path_factory.mktemp("build")
    src, out = root / "src", root / "dist"
    for name in _source_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    for hook in ("build_wheel", "build_sdist"):     # one process each, as a build frontend
        code = f"import sys; from setuptools import build_meta; build_meta.{hook}(sys.argv[1])"
        result = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"wheel": next(out.glob("*.whl")), "sdist": next(out.glob("*.tar.gz"))}


def _wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def _sdist_names(sdist: Path) -> set[str]:
    with tarfile.open(sdist) as t:
        top = t.getnames()[0].split("/")[0]
        return {n[len(top) + 1:] for n in t.getnames() if n.startswith(top + "/")}


def test_wheel_holds_every_file_of_the_package(built):
    package = {name for name in _source_files() if name.startswith("haaqi_jax/")}
    missing = package - _wheel_names(built["wheel"])
    assert not missing, f"not in the wheel: {sorted(missing)}"


def test_installed_wheel_imports_without_torch_and_runs_its_script(built, tmp_path):
    """The wheel unpacked as pip installs it, used from a folder outside the checkout: every
    module imports (torch stays out, haaqi_jax.convert aside), __version__ is the wheel's, the
    console script's target exists and `haaqi-jax --help` works."""
    site = tmp_path / "site"
    with zipfile.ZipFile(built["wheel"]) as z:
        z.extractall(site)
    modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__")
                     for n in _wheel_names(built["wheel"])
                     if n.endswith(".py") and not n.startswith("haaqi_jax/convert/"))
    dist_info = next(site.glob("*.dist-info"))
    version = re.search(r"^Version: (.+)$", (dist_info / "METADATA").read_text(), re.M)[1]
    scripts = (dist_info / "entry_points.txt").read_text()
    target = re.search(r"^haaqi-jax\s*=\s*(\S+)$", scripts, re.M)[1]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "import haaqi_jax\n"
            f"assert haaqi_jax.__file__.startswith({str(site)!r}), haaqi_jax.__file__\n"
            f"assert haaqi_jax.__version__ == {version!r}, haaqi_jax.__version__\n"
            "for name in haaqi_jax.__all__: getattr(haaqi_jax, name)\n"
            f"module, func = {target!r}.split(':')\n"
            "assert callable(getattr(importlib.import_module(module), func))\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchaudio',"
            " 'speechbrain', 'clarity'))\n"
            "assert not bad, bad\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = subprocess.run([sys.executable, "-c", code], cwd=outside, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run([sys.executable, "-m", "haaqi_jax.cli", "--help"], cwd=outside,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "demo-data" in result.stdout, result.stderr[-2000:]
    assert version == _source_version()


def test_sdist_holds_every_source_file(built):
    # The tests with their helpers (conftest.py ...), train.py, configs/, convert_weights.py,
    # benchmarks/ and docs/: an sdist is the source, and the README's commands run in it.
    missing = set(_source_files()) - _sdist_names(built["sdist"])
    assert not missing, f"not in the sdist: {sorted(missing)}"


#: The licence texts that must travel with the code: ours and the MIT notices of the code
#: ported (README, "Credits and licences").
LICENCE_FILES = ("LICENSE", "LICENSES/BEATs-MIT.txt", "LICENSES/pyclarity-MIT.txt")


def test_licences_ship_in_wheel_and_sdist(built):
    for name, holder in (("LICENSE", "The haaqi_jax authors"),
                         ("LICENSES/BEATs-MIT.txt", "Microsoft Corporation"),
                         ("LICENSES/pyclarity-MIT.txt", "The PyClarity Team")):
        text = (ROOT / name).read_text()
        assert holder in text and "Permission is hereby granted" in text, name
    wheel_names = _wheel_names(built["wheel"])
    dist_info = next(n.split("/")[0] for n in wheel_names if ".dist-info/" in n)
    for name in LICENCE_FILES:
        assert f"{dist_info}/licenses/{name}" in wheel_names, name
        assert name in _sdist_names(built["sdist"]), name
    with zipfile.ZipFile(built["wheel"]) as z:
        metadata = z.read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata
    assert set(re.findall(r"^License-File: (.+)$", metadata, re.M)) == set(LICENCE_FILES)


def test_the_version_is_written_once():
    # pyproject.toml reads haaqi_jax.__version__, so the two cannot drift apart.
    assert "version" not in PYPROJECT["project"]
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "haaqi_jax.__version__"}


#: Import names of the runtime dependencies whose distribution name differs.
IMPORT_NAME = {"orbax-checkpoint": "orbax", "ml-collections": "ml_collections"}


def test_every_runtime_dependency_is_used():
    code = "\n".join(p.read_text() for p in (ROOT / "haaqi_jax").rglob("*.py"))
    unused = []
    for text in PYPROJECT["project"]["dependencies"]:
        name = Requirement(text).name
        module = IMPORT_NAME.get(name, name.replace("-", "_"))
        if not re.search(rf"^\s*(import|from) {re.escape(module)}\b", code, re.M):
            unused.append(name)
    assert not unused, f"declared but never imported by haaqi_jax: {unused}"


#: The oldest release of a dependency with an API the package calls.
OLDEST_WITH = {
    "jax": ("0.8.0", "jax.enable_x64 as a top-level context manager (haaqi_jax.haaqi)"),
    "optax": ("0.2.5", "optax.tree.norm (haaqi_jax.train.steps)"),
    "grain": ("0.2.8", "grain.MapDataset and grain.ReadOptions at the top level "
                       "(haaqi_jax.data.pipeline)"),
}


def test_dependency_lower_bounds_admit_no_release_without_the_apis_used():
    bounds = {Requirement(r).name: Requirement(r).specifier
              for r in PYPROJECT["project"]["dependencies"]}
    too_low = [f"{name}{bounds[name]} admits releases before {oldest}, which lack {why}"
               for name, (oldest, why) in OLDEST_WITH.items()
               if any(Version(s.version) < Version(oldest) for s in bounds[name]
                      if s.operator in (">=", ">", "~=", "=="))
               or not any(s.operator in (">=", ">", "~=", "==") for s in bounds[name])]
    assert not too_low, too_low
