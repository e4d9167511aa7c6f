"""The compiled hot path: a build runs only while it matches its sources; the sources always stand in."""

from __future__ import annotations

import importlib.machinery
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from streamrec import native

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _fake_package(tmp_path: Path) -> Path:
    for name in ("serde", "state"):
        (tmp_path / f"{name}.py").write_text(f"X = '{name}'\n")
        (tmp_path / f"{name}{SUFFIX}").write_bytes(b"\x7fELF")
    (tmp_path / f"_native__mypyc{SUFFIX}").write_bytes(b"\x7fELF")
    return tmp_path


def _record(package: Path, modules: tuple[str, ...]) -> None:
    hashes = native.source_hashes(modules, package)
    (package / "_native.json").write_text(json.dumps({"modules": hashes}))


def test_no_extensions_is_not_stale(tmp_path: Path) -> None:
    (tmp_path / "serde.py").write_text("X = 1\n")
    assert native.stale(tmp_path) is None


def test_extensions_without_a_build_record_are_stale(tmp_path: Path) -> None:
    assert native.stale(_fake_package(tmp_path)) == "no build record"


def test_a_build_matching_its_sources_is_used(tmp_path: Path) -> None:
    package = _fake_package(tmp_path)
    _record(package, ("streamrec.serde", "streamrec.state"))
    assert set(native.extensions(package)) == {"streamrec.serde", "streamrec.state"}
    assert native.stale(package) is None


def test_an_edited_source_makes_the_build_stale(tmp_path: Path) -> None:
    package = _fake_package(tmp_path)
    _record(package, ("streamrec.serde", "streamrec.state"))
    (package / "state.py").write_text("X = 'edited'\n")
    assert native.stale(package) == "changed since the build: streamrec.state"


def test_a_module_missing_from_the_build_record_is_stale(tmp_path: Path) -> None:
    package = _fake_package(tmp_path)
    _record(package, ("streamrec.serde",))
    assert native.stale(package) is not None


def _python(code: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-W", "always", "-c", code]
    return subprocess.run(argv, capture_output=True, text=True, check=True)


def test_use_sources_loads_every_compiled_module_from_its_python_file() -> None:
    out = _python(
        "import json; from streamrec import native; native.use_sources('told to'); "
        "print(json.dumps(native.active()))"
    )
    assert json.loads(out.stdout) == {m: "source" for m in native.COMPILED}
    assert "compiled modules not used (told to)" in out.stderr


def test_use_sources_refuses_after_a_compiled_module_is_imported() -> None:
    with pytest.raises(subprocess.CalledProcessError) as err:
        _python("import streamrec.state; from streamrec import native; native.use_sources()")
    assert "already imported" in err.value.stderr


def test_the_installed_build_is_what_runs() -> None:
    """After `make install` the compiled group runs if it matches its sources; if not, all run as source."""
    out = _python("import json; from streamrec import native; print(json.dumps(native.active()))")
    modules = json.loads(out.stdout)
    compiled = bool(native.extensions()) and native.stale() is None
    assert modules == {m: "compiled" if compiled else "source" for m in native.COMPILED}


def test_where_a_c_compiler_is_present_the_hot_path_is_compiled_and_current() -> None:
    """The performance figures assume the compiled hot path: `make install` builds it, and where it could
    (a C compiler is on the PATH) a build that failed, or one older than its sources, fails here."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}): the Python sources run, as the README says")
    built, stale = bool(native.extensions()), native.stale()
    assert built and stale is None, f"not compiled ({stale or 'nothing built'}): `make native` says why"
    out = _python("import json; from streamrec import native; print(json.dumps(native.active()))")
    assert json.loads(out.stdout) == dict.fromkeys(native.COMPILED, "compiled")
