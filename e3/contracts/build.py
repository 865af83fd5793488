"""Regenerates the Python gRPC stubs from proto/ (run after editing a .proto).

protoc writes `import e3_pb2` into the service stub; it is rewritten to a
package-relative import so the stubs live inside `e3.contracts`.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto" / "e3" / "v1"
OUT_DIR = Path(__file__).resolve().parent


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {PROTO_DIR}")
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main(args + [str(p) for p in protos]) != 0:
        raise RuntimeError(f"protoc failed on {[p.name for p in protos]}")
    written = []
    for proto in protos:
        stem = proto.stem
        for name in (f"{stem}_pb2.py", f"{stem}_pb2_grpc.py"):
            path = out_dir / name
            text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", path.read_text(), flags=re.M)
            path.write_text(text)
            written.append(path)
    return written


def stale_files() -> list[str]:
    """Names of committed stubs that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [p.name for p in fresh if not (OUT_DIR / p.name).exists() or (OUT_DIR / p.name).read_text() != p.read_text()]


if __name__ == "__main__":
    for path in generate(OUT_DIR):
        print(f"wrote {path}", file=sys.stderr)
