"""The wheel as pip builds it: tagged py3-none-<platform> (ctypes, no CPython ABI) and carrying
a stripped library that still exports the C ABI."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]


def test_wheel_is_py3_none_platform_with_a_stripped_library(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
         "-w", str(tmp_path), str(PACKAGE)],
        check=True,
    )
    (wheel,) = tmp_path.glob("mxpipe-*.whl")
    name, version, python, abi, platform = wheel.stem.split("-")
    assert (name, python, abi) == ("mxpipe", "py3", "none"), wheel.name
    assert platform.startswith(("linux", "manylinux", "macosx")), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        library = next(n for n in archive.namelist() if n.startswith("mxpipe/libmxpipe."))
        archive.extract(library, tmp_path)
        assert "Root-Is-Purelib: false" in archive.read(
            f"mxpipe-{version}.dist-info/WHEEL").decode()
    sections = subprocess.run(["readelf", "-S", str(tmp_path / library)], capture_output=True,
                              text=True, check=True).stdout
    assert ".symtab" not in sections and ".debug_info" not in sections
    exported = subprocess.run(["nm", "-D", "--defined-only", str(tmp_path / library)],
                              capture_output=True, text=True, check=True).stdout
    assert " T mxp_dispatcher_new" in exported
