"""Pin the image's Python dependencies to the versions the tests ran with.

Reads `[project].dependencies` (plus the extras named with --extra) from pyproject.toml, walks
their requirement closure through the metadata of the distributions installed in the running
interpreter (the dev venv), and prints a requirements file of exact pins. The image installs that
file with `--no-deps`, so the image runs exactly what `make test` ran, and `pip check` in the build
catches a lock that missed something.

    .venv/bin/python layers/lock.py --extra s3 > layers/.build/requirements.txt
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def top_level(pyproject: Path, extras: list[str]) -> list[Requirement]:
    """The project's runtime requirements and those of `extras`."""
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project.get("optional-dependencies", {})[extra]
    return [Requirement(spec) for spec in specs]


def applies(req: Requirement, extras: set[str]) -> bool:
    """Whether `req` is needed on this platform for a distribution asked with `extras`."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in extras or {""})


def closure(roots: list[Requirement]) -> dict[str, str]:
    """Canonical name -> installed version for `roots` and everything they pull in."""
    pins: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [req for req in roots if applies(req, set())]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"lock: {req.name} is required but not installed in {sys.prefix}")
        version = dist.version
        if not req.specifier.contains(Version(version), prereleases=True):
            sys.exit(f"lock: installed {req.name}=={version} does not satisfy {req}")
        pins[name] = version
        for spec in dist.requires or []:
            child = Requirement(spec)
            if applies(child, set(req.extras)):
                todo.append(child)
    return pins


def main(argv: list[str] | None = None) -> int:
    """Print the pinned requirements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--extra", action="append", default=[], help="optional extra to include")
    args = parser.parse_args(argv)
    pins = closure(top_level(args.pyproject, args.extra))
    print(f"# Written by layers/lock.py from {args.pyproject}, extras {args.extra}; do not edit.")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
