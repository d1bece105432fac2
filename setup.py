"""Package discovery for petl-toolkit.

The repository keeps `cli/` and `recipes/` as top-level folders (see DESIGN.md), but they are
installed under the `petl` namespace (`petl.cli`, `petl.recipes`) so that no generic top-level
import name is put into site-packages. Metadata lives in pyproject.toml.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["petl", "petl.*"])
packages += ["petl.cli", "petl.recipes"]

setup(
    packages=packages,
    package_dir={"petl.cli": "cli", "petl.recipes": "recipes"},
    package_data={
        "petl.recipes": ["*.yaml", "**/*.yaml"],
        "petl.assets": ["**/*.json", "**/*.safetensors", "**/*.md", "**/*.txt"],
        "petl.tasks": ["data/*.jsonl", "data/*.md"],
    },
    include_package_data=False,
)
