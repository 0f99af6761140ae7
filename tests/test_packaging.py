"""The package as users install it: a real wheel beside Hugging Face's `tokenizers`, the wheel without it, and
the editable install `make venv` makes, each in a throwaway venv and imported from outside the checkout.

Why: our `tokenizers/` folder has the import name of HF's package. A wheel ships it as `roar_tokenizers` so that
HF's files in site-packages stay untouched, and lightning_modules/compat.py serves `tokenizers.<ours>` from it;
the checkout tests (tests/test_hf_tokenizers.py) never exercise that path.

The venvs are made `--without-pip` and driven by this interpreter's pip (`pip --python`), with `--no-deps`, so no
resolver ever sees torch. torch & co. come from this interpreter's site-packages through a .pth line naming a
folder of symlinks to its entries minus HF's tokenizers / transformers and roar itself: leaving HF out is what
makes "HF not installed" testable, and a .pth path line does not run that folder's own .pth files, so this
environment's editable roar finder stays inactive.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

SCRIPTS = ["roar-train", "roar-sample", "roar-evaluate", "roar-demo", "roar-ablate", "roar-edit", "roar-export",
           "roar-import-official", "roar-parity", "roar-bench", "roar-train-tokenizer", "roar-pretokenize",
           "roar-shards", "roar-launch", "roar-train-extractor", "roar-eval-tokenizer"]
# what the build reads; setuptools writes build/ and *.egg-info into the source tree, so it builds from a copy
BUILD_INPUTS = ["pyproject.toml", "setup.py", "README.md", "lightning_modules", "datamodules", "experiments",
                "tokenizers"]
LEFT_OUT = ("tokenizers", "transformers", "roar", "__editable__")  # site-packages entries the venvs must not see
PIP_TIMEOUT, RUN_TIMEOUT = 300, 180

CHECK = r'''
import json, sys

def hf():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")("a b c")["input_ids"] == [0, 1, 2]

def roar():
    import lightning_modules  # noqa: F401  (installs the tokenizers finder, as every roar package does)
    from tokenizers.registry import build_tokenizer
    import torch
    tok = build_tokenizer("pixel", levels=17)
    grey = torch.round((torch.arange(2 * 64) % 17) * (255 / 16))  # the 17 levels, as the digits are scaled
    img = grey.to(torch.uint8).reshape(2, 1, 8, 8).expand(2, 3, 8, 8)
    codes = tok.encode(img)
    assert codes.shape == (2, 8, 8) and torch.equal(tok.decode(codes), img), "pixel tokenizer round trip"

for step in {"hf-first": (hf, roar), "roar-first": (roar, hf), "roar-only": (roar,)}[sys.argv[1]]:
    step()
import lightning_modules, tokenizers, tokenizers.registry
print(json.dumps({"lightning_modules": lightning_modules.__file__, "registry": tokenizers.registry.__file__,
                  "tokenizers": tokenizers.__file__, "hf": hasattr(tokenizers, "Tokenizer")}))
'''

ENTRY_POINTS = r'''
import importlib.metadata, json
eps = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.dist.name == "roar"]
print(json.dumps({ep.name: callable(ep.load()) for ep in eps}))
'''


def clean_env() -> dict:
    # no PYTHONPATH: the checkout must not leak into the venvs; no bytecode written into the shared site-packages
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run(cmd: list[str], cwd, timeout: int = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=str(cwd), env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def no_build_isolation() -> list[str]:
    # offline with the visible setuptools (this interpreter's, also seen by the venvs); the index only without one
    return [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]


def pip(venv_python: str, *args: str, cwd) -> None:
    run([sys.executable, "-m", "pip", "--python", venv_python, "install", "-q", "--no-deps", "--no-compile", *args],
        cwd=cwd, timeout=PIP_TIMEOUT)


def site_packages(venv: str) -> str:
    return os.path.join(venv, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages")


def make_venv(path, farm: str) -> str:
    venv = str(path)
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=os.path.dirname(venv))
    with open(os.path.join(site_packages(venv), "outer.pth"), "w") as f:
        f.write(farm + "\n")
    return os.path.join(venv, "bin", "python")


def tree_digest(directory: str) -> dict[str, str]:
    out = {}
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def check(venv_python: str, order: str, cwd) -> dict:
    return json.loads(run([venv_python, "-c", CHECK, order], cwd=cwd).stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def farm(tmp_path_factory) -> str:
    outer = sysconfig.get_path("purelib")  # the site-packages of the interpreter running the tests
    farm = str(tmp_path_factory.mktemp("outer-site"))
    for name in os.listdir(outer):
        if name.lower().startswith(LEFT_OUT) or name.endswith(".pth") or name == "__pycache__":
            continue
        os.symlink(os.path.join(outer, name), os.path.join(farm, name))
    return farm


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    src = str(tmp_path_factory.mktemp("src"))
    for name in BUILD_INPUTS:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(src, name), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src)
    return src


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> str:
    dist = str(tmp_path_factory.mktemp("dist"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *no_build_isolation(), "-w", dist, source],
        cwd=dist, timeout=PIP_TIMEOUT)
    (name,) = os.listdir(dist)
    return os.path.join(dist, name)


@pytest.fixture(scope="module")
def hf_wheels(tmp_path_factory) -> list[str]:
    try:  # the versions this environment runs with, so transformers matches the huggingface_hub it will import
        pins = [f"{p}=={importlib.metadata.version(p)}" for p in ("tokenizers", "transformers")]
    except importlib.metadata.PackageNotFoundError as err:
        pytest.skip(f"Hugging Face {err.name} is not installed here (the dev extra): nothing to pin")
    out = str(tmp_path_factory.mktemp("hf-wheels"))
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", out, *pins],
                          env=clean_env(), capture_output=True, text=True, timeout=PIP_TIMEOUT)
    if proc.returncode != 0:  # no index reachable: an environment problem, not a packaging one
        pytest.skip(f"pip download {' '.join(pins)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return [os.path.join(out, n) for n in sorted(os.listdir(out))]


def test_wheel_beside_huggingface_tokenizers(wheel, hf_wheels, farm, tmp_path):
    py = make_venv(tmp_path / "venv", farm)
    site = site_packages(str(tmp_path / "venv"))
    pip(py, "--no-index", *hf_wheels, cwd=tmp_path)
    hf_before = tree_digest(os.path.join(site, "tokenizers"))
    pip(py, wheel, cwd=tmp_path)

    assert tree_digest(os.path.join(site, "tokenizers")) == hf_before, "our wheel changed HF's tokenizers/ files"
    with open(os.path.join(site, "roar-0.1.0.dist-info", "RECORD")) as f:
        clashing = [line for line in f if line.startswith("tokenizers/")]
    assert not clashing, f"our wheel writes into HF's package: {clashing[:3]}"
    assert os.path.isfile(os.path.join(site, "roar_tokenizers", "registry.py"))

    for order in ("hf-first", "roar-first"):
        where = check(py, order, cwd=tmp_path)  # cwd outside the checkout: only the venv can provide roar
        assert where["lightning_modules"].startswith(site), (order, where)
        assert where["registry"] == os.path.join(site, "roar_tokenizers", "registry.py"), (order, where)
        assert where["tokenizers"] == os.path.join(site, "tokenizers", "__init__.py") and where["hf"], (order, where)

    missing = [s for s in SCRIPTS if not os.access(os.path.join(tmp_path, "venv", "bin", s), os.X_OK)]
    assert not missing, f"console scripts not installed: {missing}"
    loaded = json.loads(run([py, "-c", ENTRY_POINTS], cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert sorted(loaded) == sorted(SCRIPTS) and all(loaded.values()), loaded
    roar_train = os.path.join(tmp_path, "venv", "bin", "roar-train")
    assert "usage: roar-train" in run([roar_train, "--help"], cwd=tmp_path).stdout
    # the shipped presets resolve from any working directory (they live in site-packages/experiments/configs)
    assert "variant: raster" in run([roar_train, "-c", "experiments/configs/debug_raster.yaml", "--print-config"],
                                    cwd=tmp_path).stdout


def test_wheel_without_huggingface_tokenizers(wheel, farm, tmp_path):
    py = make_venv(tmp_path / "venv", farm)
    site = site_packages(str(tmp_path / "venv"))
    pip(py, wheel, cwd=tmp_path)
    where = check(py, "roar-only", cwd=tmp_path)
    # no HF package anywhere: the finder serves our package itself under the name `tokenizers`
    assert where["tokenizers"] == os.path.join(site, "roar_tokenizers", "__init__.py") and not where["hf"], where
    assert where["registry"] == os.path.join(site, "roar_tokenizers", "registry.py"), where
    # the console script that imports tokenizers.pretokenize, whose module path does not start at a roar package
    assert "usage: roar-pretokenize" in run([os.path.join(tmp_path, "venv", "bin", "roar-pretokenize"), "--help"],
                                            cwd=tmp_path).stdout


def test_editable_install_used_outside_the_checkout(source, hf_wheels, farm, tmp_path):
    # what `make venv` makes (pip install -e), seen from another working directory, where the top-level
    # `tokenizers` on sys.path is HF's
    py = make_venv(tmp_path / "venv", farm)
    pip(py, "--no-index", *hf_wheels, cwd=tmp_path)
    pip(py, *no_build_isolation(), "-e", source, cwd=tmp_path)
    for order in ("hf-first", "roar-first"):
        where = check(py, order, cwd=tmp_path)
        assert where["lightning_modules"] == os.path.join(source, "lightning_modules", "__init__.py"), where
        assert where["registry"] == os.path.join(source, "tokenizers", "registry.py"), where
        assert where["hf"], where
