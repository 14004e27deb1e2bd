"""The generated stubs shipped in lorafleet.proto must match proto/lorafleet/v1/serving.proto."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.proto import generate
from lorafleet.proto.lorafleet.v1 import serving_pb2, serving_pb2_grpc

pytest.importorskip("grpc_tools")


def _tools_version_of_shipped_stub() -> str:
    text = (generate.PROTO_ROOT / "lorafleet/v1/serving_pb2_grpc.py").read_text()
    match = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", text)
    assert match, "serving_pb2_grpc.py carries no GRPC_GENERATED_VERSION"
    return match.group(1)


def test_shipped_descriptor_matches_the_proto_source(tmp_path: Path) -> None:
    # Compare the compiled schema itself: independent of the grpcio-tools version that made it.
    from grpc_tools import protoc

    out = tmp_path / "serving.desc"
    rc = protoc.main(
        ["grpc_tools.protoc", f"-I{generate.PROTO_ROOT}", f"--descriptor_set_out={out}"]
        + [str(generate.PROTO_ROOT / p) for p in generate.PROTO_FILES]
    )
    assert rc == 0
    from google.protobuf import descriptor_pb2

    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    # python_out drops json_name (derivable from the field name); drop it here too.
    for message in fresh.message_type:
        for field in message.field:
            field.ClearField("json_name")
    shipped = descriptor_pb2.FileDescriptorProto.FromString(serving_pb2.DESCRIPTOR.serialized_pb)
    assert fresh == shipped, "serving.proto changed since the stubs were generated: run proto/generate.py"


def test_shipped_stubs_are_byte_identical_to_a_fresh_generation(tmp_path: Path) -> None:
    installed = importlib.metadata.version("grpcio-tools")
    if installed != _tools_version_of_shipped_stub():
        pytest.skip(f"grpcio-tools {installed} differs from the one that made the stubs")
    for fresh in generate.generate_into(tmp_path):
        shipped = generate.PROTO_ROOT / fresh.relative_to(tmp_path)
        assert shipped.read_bytes() == fresh.read_bytes(), f"{shipped} is stale: run proto/generate.py"


def test_check_mode_reports_current_stubs() -> None:
    script = generate.PROTO_ROOT / "generate.py"
    if importlib.metadata.version("grpcio-tools") != _tools_version_of_shipped_stub():
        pytest.skip("grpcio-tools version differs from the one that made the stubs")
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_grpc_stub_imports_resolve_inside_the_package() -> None:
    assert serving_pb2_grpc.LoraFleetStub is not None
    assert serving_pb2.DESCRIPTOR.name == "lorafleet/v1/serving.proto"
    assert serving_pb2.DESCRIPTOR.package == "lorafleet.v1"
    methods = {m.name for m in serving_pb2.DESCRIPTOR.services_by_name["LoraFleet"].methods}
    assert methods == {"Generate", "RegisterAdapter", "UnregisterAdapter", "ListAdapters", "GetClusterStatus"}
