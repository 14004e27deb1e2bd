"""Regenerate the Python stubs shipped beside proto/lorafleet/v1/serving.proto.

Run from anywhere: `.venv/bin/python proto/generate.py` (needs grpcio-tools, the `dev` extra).
`tests/api/test_stubs.py` fails when the shipped stubs differ from what this script produces.

The stubs live in the package `lorafleet.proto.lorafleet.v1`, so the generated absolute import
`from lorafleet.v1 import ...` is rewritten to that package; the descriptor keeps its canonical
file name `lorafleet/v1/serving.proto` (what server reflection reports).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("lorafleet/v1/serving.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py")
_IMPORT_FROM = "from lorafleet.v1 import "
_IMPORT_TO = "from lorafleet.proto.lorafleet.v1 import "


def generated_names(proto_file: str) -> list[str]:
    stem = proto_file.removesuffix(".proto")
    return [stem + suffix for suffix in GENERATED_SUFFIXES]


def generate_into(out_dir: Path) -> list[Path]:
    """Compile every proto file into out_dir (same relative layout); returns the written files."""
    import grpc_tools
    from grpc_tools import protoc  # dev-only dependency, imported lazily on purpose

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_ROOT / p) for p in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {PROTO_FILES}")
    written = []
    for proto_file in PROTO_FILES:
        for name in generated_names(proto_file):
            path = out_dir / name
            path.write_text(path.read_text().replace(_IMPORT_FROM, _IMPORT_TO))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the shipped stubs are stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate_into(Path(tmp))
        stale = []
        for path in fresh:
            rel = path.relative_to(tmp)
            shipped = PROTO_ROOT / rel
            if not shipped.exists() or shipped.read_bytes() != path.read_bytes():
                stale.append(str(rel))
                if not args.check:
                    shutil.copyfile(path, shipped)
    if args.check:
        if stale:
            print(f"stale stubs: {', '.join(stale)}; run proto/generate.py", file=sys.stderr)
            return 1
        return 0
    print("updated: " + (", ".join(stale) if stale else "nothing (stubs were current)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
