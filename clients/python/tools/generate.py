"""Generates the client's stubs from the hub's proto with grpcio-tools.

    python tools/generate.py            # writes src/shapeblock_hub/_generated/
    python tools/generate.py --out DIR  # writes DIR (the drift test compares the two)

The generated modules sit flat in one package, so the import grpcio-tools writes between them
(`from shapeblock.hub.v1 import hub_pb2`) is made relative.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent.parent
PROTO_ROOT = HERE.parent.parent / "crates" / "proto" / "proto"
PROTO = "shapeblock/hub/v1/hub.proto"
DEFAULT_OUT = HERE / "src" / "shapeblock_hub" / "_generated"
FILES = ("hub_pb2.py", "hub_pb2.pyi", "hub_pb2_grpc.py")
INIT = '"""Generated from crates/proto/proto/shapeblock/hub/v1/hub.proto: do not edit."""\n'


def generate(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {PROTO}")
        out.mkdir(parents=True, exist_ok=True)
        generated = Path(tmp) / "shapeblock" / "hub" / "v1"
        for name in FILES:
            text = (generated / name).read_text()
            text = text.replace("from shapeblock.hub.v1 import hub_pb2", "from . import hub_pb2")
            (out / name).write_text(text)
        (out / "__init__.py").write_text(INIT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out: Path = parser.parse_args().out
    if out.exists() and out != DEFAULT_OUT:
        shutil.rmtree(out)
    generate(out)
    print(f"generated {', '.join(FILES)} in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
