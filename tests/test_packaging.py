"""pyproject lists every package: a sub-folder missing from `packages` would import from a checkout
(editable installs map folders) but be left out of a wheel, and so out of the GPU image."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _folder_of(package: str, package_dir: dict[str, str]) -> Path:
    """The folder setuptools reads `package` from: its nearest mapped ancestor's folder + the rest."""
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        mapped = package_dir.get(".".join(parts[:n]))
        if mapped is not None:
            return ROOT / mapped / Path(*parts[n:])
    raise AssertionError(f"{package}: no package-dir entry covers it")


def test_every_listed_package_is_a_folder_with_an_init() -> None:
    config = _setuptools()
    for package in config["packages"]:
        folder = _folder_of(package, config["package-dir"])
        assert (folder / "__init__.py").is_file(), f"{package}: {folder.relative_to(ROOT)} has no __init__.py"


def test_every_package_folder_is_listed() -> None:
    config = _setuptools()
    listed = set(config["packages"])
    for package, folder in config["package-dir"].items():
        root = ROOT / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            name = ".".join([package, *rel.parts])
            folder_name = init.parent.relative_to(ROOT)
            assert name in listed, f"{folder_name} is a package missing from pyproject's packages"
