"""Regenerates the Python gRPC stubs from proto/ (run after editing a .proto).

protoc writes `import e3_pb2` into the service stub; it is rewritten to a
package-relative import so the stubs live inside `e3.contracts`.

The service stub refuses to import under a grpcio older than its
GRPC_GENERATED_VERSION, which grpcio-tools sets to its own version. The stubs
use nothing newer than grpcio 1.70 (`_registered_method` and
`add_registered_method_handlers` came in 1.63/1.64), so the check is rewritten to
GRPC_MINIMUM, pyproject.toml's floor: the stubs then import in vLLM's image
whatever grpcio >= 1.70 it carries (vLLM pins none; its OpenTelemetry exporter
asks for >= 1.63.2), and every image pins grpcio from requirements/cpu.lock on
top (deploy/docker/requirements/*.txt).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto" / "e3" / "v1"
OUT_DIR = Path(__file__).resolve().parent
GRPC_MINIMUM = "1.70.0"  # keep equal to grpcio's floor in pyproject.toml


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
            text, found = re.subn(r"^GRPC_GENERATED_VERSION = '[^']*'$", f"GRPC_GENERATED_VERSION = '{GRPC_MINIMUM}'",
                                  text, flags=re.M)
            if name.endswith("_grpc.py") and found != 1:
                raise RuntimeError(f"{name}: no GRPC_GENERATED_VERSION line to set to {GRPC_MINIMUM}")
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
