"""The worker's pure-Python hot path, compiled with mypyc when it can be: build it, and load it only while it
matches its sources.

`make install` runs ``streamrec native build`` (also ``make native``): the modules in ``COMPILED`` (state
encoding and decoding, the record types, the Avro writers, the online-accuracy counters, the encoder's
input windows, the rate limit and bot detector) become C extensions beside their sources, ~25% less CPU per
event in the event stage. They are optional: without a C compiler the build fails with a message and the
sources run unchanged. An
extension is only imported while ``_native.json`` records the hash of the very source it was built from;
after an edit of any of them, all of them load from source (they are one compiled group that calls itself
natively, so they cannot be mixed) until the next build, so a stale build never runs.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGE_DIR = Path(__file__).resolve().parent
MANIFEST = PACKAGE_DIR / "_native.json"
COMPILED = (
    "streamrec.records",
    "streamrec.serde",
    "streamrec.state",
    "streamrec.triggers",
    "streamrec.windows",
    "streamrec.validation",
    "streamrec.partitioner",
    "streamrec.abuse",
)
STATUS = "import sys; from streamrec import native; sys.exit(native.main(['status']))"
GROUP = "streamrec._native"  # the shared library of the group: streamrec/_native__mypyc.*.so


def source_path(module: str, package_dir: Path = PACKAGE_DIR) -> Path:
    return package_dir / (module.rsplit(".", 1)[1] + ".py")


def source_hashes(modules: Sequence[str] = COMPILED, package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    return {m: hashlib.sha256(source_path(m, package_dir).read_bytes()).hexdigest() for m in modules}


def extensions(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """The compiled modules present for this interpreter, by module name (the group's library left out)."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return {
        f"streamrec.{p.name[: -len(suffix)]}": p
        for p in package_dir.glob(f"*{suffix}")
        if not p.name.startswith("_native__mypyc")
    }


def stale(package_dir: Path = PACKAGE_DIR) -> str | None:
    """Why the extensions in ``package_dir`` must not be loaded, or None when they match their sources."""
    found = extensions(package_dir)
    if not found:
        return None
    manifest = package_dir / MANIFEST.name
    if not manifest.exists():
        return "no build record"
    built = json.loads(manifest.read_text()).get("modules", {})
    if set(found) != set(built):
        return f"built {sorted(built)}, present {sorted(found)}"
    changed = [m for m, digest in source_hashes(sorted(found), package_dir).items() if built[m] != digest]
    return f"changed since the build: {', '.join(changed)}" if changed else None


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the listed modules' .py sources ahead of their extensions."""

    def __init__(self, sources: dict[str, Path]) -> None:
        self.sources = sources

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = self.sources.get(fullname)
        return None if source is None else importlib.util.spec_from_file_location(fullname, source)


def use_sources(why: str | None = None) -> None:
    """Load the compiled modules from their sources from now on (called before any of them is imported)."""
    loaded = [m for m in COMPILED if m in sys.modules]
    if loaded:
        raise RuntimeError(f"already imported: {loaded}")
    if not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        names = set(COMPILED) | set(extensions())
        sys.meta_path.insert(0, _SourceFinder({m: source_path(m) for m in names}))
    if why:
        warnings.warn(
            f"streamrec: compiled modules not used ({why}); running the Python sources. "
            "`make native` rebuilds them.",
            RuntimeWarning,
            stacklevel=2,
        )


def guard() -> None:
    """At package import: fall back to the sources when the extensions are stale."""
    why = stale()
    if why is not None:
        use_sources(why)


def active() -> dict[str, str]:
    """ "compiled" or "source" for each module of the group, importing them."""
    out = {}
    for name in COMPILED:
        module = importlib.import_module(name)
        out[name] = "source" if (module.__file__ or "").endswith(".py") else "compiled"
    return out


def build(build_dir: Path | None = None) -> None:
    """Compile ``COMPILED`` with mypyc into extensions beside the sources and record their hashes."""
    from mypyc.build import mypycify  # mypy's compiler, in the dev dependencies
    from setuptools import Distribution

    clean()
    root = PACKAGE_DIR.parent
    work = Path(build_dir or tempfile.mkdtemp(prefix="streamrec-native-"))
    hashes = source_hashes()
    sources = [str(source_path(m).relative_to(root)) for m in COMPILED]
    cwd = Path.cwd()
    try:
        os.chdir(root)  # mypy names a module by its path: streamrec/serde.py is streamrec.serde
        ext_modules = mypycify(sources, opt_level="3", group_name=GROUP, target_dir=str(work / "c"))
        dist = Distribution({"name": "streamrec-native", "ext_modules": ext_modules})
        cmd = dist.get_command_obj("build_ext")
        cmd.inplace = True  # type: ignore[attr-defined]
        cmd.build_temp = str(work / "temp")  # type: ignore[attr-defined]
        dist.run_command("build_ext")
    finally:
        os.chdir(cwd)
        if build_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if source_hashes() != hashes:
        clean()
        raise RuntimeError("a source changed during the build: run it again")
    MANIFEST.write_text(json.dumps({"modules": hashes, "python": sys.version.split()[0]}, indent=2) + "\n")


def clean() -> None:
    """Remove the extensions and their record: the sources run."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for path in PACKAGE_DIR.glob(f"*{suffix}"):
        path.unlink()
    MANIFEST.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "status"
    if command == "build":
        try:
            build()
        except Exception as exc:  # no compiler, no mypy: the sources run as they are
            clean()
            why = f"{type(exc).__name__}: {exc}"
            print(f"streamrec native: not compiled ({why}); the sources run", file=sys.stderr)
            return 1
        # A fresh interpreter imports what was built (this one may have loaded the sources already).
        return subprocess.run([sys.executable, "-c", STATUS], check=False).returncode
    if command == "clean":
        clean()
        return 0
    if command == "status":
        print(json.dumps({"stale": stale(), "modules": active()}))
        return 0 if stale() is None else 1
    print("usage: streamrec native [build|clean|status]", file=sys.stderr)
    return 2
