"""The package list for setuptools; everything else is in pyproject.toml.

Why a setup.py: the source folder ``tokenizers/`` must install as ``roar_tokenizers``, because Hugging Face's
``tokenizers`` (needed by transformers) owns ``site-packages/tokenizers/`` and a wheel of ours would overwrite
its files. pyproject's ``packages.find`` cannot rename a package, and a hand-written list in pyproject would
silently leave out every subpackage added later. How ``tokenizers.<ours>`` still imports: lightning_modules/compat.py.
"""
from setuptools import find_namespace_packages, find_packages, setup

ROOTS = ("lightning_modules", "datamodules", "experiments")

packages = find_packages(include=[p for r in ROOTS for p in (r, f"{r}.*")])
# configs/ and slurm/ hold data only (YAML presets, sbatch scripts): listed as namespace packages, setuptools ships
# their files (pyproject's package-data) without a warning per folder on every install
packages += find_namespace_packages(include=["experiments.configs", "experiments.configs.*", "experiments.slurm"])
packages += ["roar_tokenizers"] + [f"roar_tokenizers.{p}" for p in find_packages("tokenizers")]

setup(packages=packages, package_dir={"roar_tokenizers": "tokenizers"})
