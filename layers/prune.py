"""Drop what the llama-cpp-python wheel installs twice, before the venv becomes an image layer.

The wheel carries CMake's install tree too: `site-packages/lib` (the same shared libraries again,
plus CMake and pkg-config files) and `site-packages/include`, none of which Python loads. And it
holds each library three times (`libx.so`, `libx.so.0`, `libx.so.0.y.z`) because a wheel cannot
hold symlinks. This removes the former and turns the copies back into links: about a third of the
dependency layer. Run it with the venv's Python; it imports llama_cpp at the end to prove the
libraries still load.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

DIST = "llama-cpp-python"


def cmake_leftovers(site: Path) -> set[Path]:
    """Top-level `lib/` and `include/` folders that the wheel's RECORD says it installed."""
    files = metadata.distribution(DIST).files or []
    tops = {f.parts[0] for f in files if f.parts and f.parts[0] in {"lib", "include"}}
    return {site / top for top in tops if (site / top).is_dir()}


def link_copies(libdir: Path) -> int:
    """Replace identical copies of a library with relative symlinks; returns bytes saved."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(libdir.glob("lib*.so*")):
        if path.is_file() and not path.is_symlink():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            groups.setdefault(digest, []).append(path)
    saved = 0
    for paths in groups.values():
        keep = max(paths, key=lambda p: len(p.name))  # the fully versioned name is the real file
        for path in paths:
            if path != keep:
                saved += path.stat().st_size
                path.unlink()
                path.symlink_to(keep.name)
    return saved


def main(argv: list[str] | None = None) -> int:
    """Prune the running interpreter's site-packages, then check llama_cpp imports."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--no-import-check",
        action="store_true",
        help="skip `import llama_cpp` (CUDA: the driver's libcuda exists only at run time)",
    )
    args = parser.parse_args(argv)
    site = Path(sysconfig.get_path("purelib"))
    saved = 0
    for folder in sorted(cmake_leftovers(site)):
        saved += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder)
    saved += link_copies(site / "llama_cpp" / "lib")
    print(f"prune: saved {saved / 1e6:.1f} MB")
    if not args.no_import_check:
        import llama_cpp

        print(f"prune: llama_cpp {llama_cpp.__version__} loads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
