"""The grpc/protobuf floors agree everywhere: pyproject.toml, the CI pins and the shipped stubs.

The stubs check at import that grpcio and protobuf are at least the versions that generated them,
so a floor in pyproject.toml lower than those would install and then fail at import; CI's floor
venv (`.ci/floor-versions.txt`) must pin exactly the declared floors to prove anything.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOOR_PACKAGES = ("grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf")

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the floors do not depend on it


def _declared_floors() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for spec in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", spec.replace(" ", ""))
        if match and match.group(1) in FLOOR_PACKAGES:
            floors[match.group(1)] = match.group(2)
    return floors


def _ci_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "floor-versions.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"floor-versions.txt: {line!r} is not an exact pin (NAME==VERSION)"
            pins[name.strip()] = version.strip()
    return pins


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_every_grpc_package_has_a_floor_in_pyproject() -> None:
    assert sorted(_declared_floors()) == sorted(FLOOR_PACKAGES)


def test_ci_pins_exactly_the_declared_floors() -> None:
    assert _ci_pins() == _declared_floors()


def test_floors_are_at_most_the_issue_limits() -> None:
    # Issue 12: stubs that run on grpcio 1.76 (or older) and protobuf 6.x (or older).
    floors = _declared_floors()
    assert _version(floors["grpcio"]) <= (1, 76, 0)
    assert _version(floors["protobuf"]) < (7,)


def test_shipped_stubs_need_no_more_than_the_floors() -> None:
    stubs = ROOT / "proto" / "lorafleet" / "v1"
    grpc_stub = (stubs / "serving_pb2_grpc.py").read_text()
    generated = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_stub)
    assert generated, "serving_pb2_grpc.py carries no GRPC_GENERATED_VERSION"
    floors = _declared_floors()
    assert _version(generated.group(1)) <= _version(floors["grpcio"])
    pb2 = (stubs / "serving_pb2.py").read_text()
    gencode = re.search(r"Protobuf Python Version: ([0-9.]+)", pb2)
    assert gencode, "serving_pb2.py names no protobuf gencode version"
    assert _version(gencode.group(1)) <= _version(floors["protobuf"])


def test_dev_generator_is_pinned_to_the_grpcio_floor() -> None:
    # A newer generator would stamp a newer minimum into the stubs than the floor admits.
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert f"grpcio-tools=={_declared_floors()['grpcio']}" in dev


@pytest.mark.skipif(
    os.environ.get("LORAFLEET_EXPECT_FLOORS") != "1", reason="only in CI's floor venv (.ci/run)"
)
def test_this_run_has_exactly_the_floor_versions() -> None:
    # CI's floor run sets LORAFLEET_EXPECT_FLOORS=1: the API tests around this one then prove the floors.
    installed = {name: importlib.metadata.version(name) for name in FLOOR_PACKAGES}
    assert installed == _ci_pins()
