"""Builds the Rust library as part of `pip install ./bindings/python`.

The package is plain Python over mxpipe's C ABI (ctypes), so the only native part is
libmxpipe.so. The build_py step runs `cargo build --release --lib` in the repository this file
lives in (two levels up) and copies the library into the package, stripped of its symbol table
and debug information (`strip --strip-unneeded`; the exported mxp_* symbols stay). The wheel is
platform-specific but uses no CPython ABI (ctypes only), so it is tagged py3-none-<platform>:
one wheel serves every Python 3 on that platform. Set MXPIPE_LIBRARY to the path of a libmxpipe
built elsewhere to skip cargo.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools before 70.1
    from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LIBRARY_NAMES = {"linux": "libmxpipe.so", "darwin": "libmxpipe.dylib", "win32": "mxpipe.dll"}


def find_cargo() -> str:
    for candidate in (
        os.environ.get("CARGO"),
        shutil.which("cargo"),
        str(Path.home() / ".cargo" / "bin" / "cargo"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    raise SystemExit("mxpipe: cargo not found (install Rust, or set CARGO or MXPIPE_LIBRARY)")


def build_rust_library() -> Path:
    prebuilt = os.environ.get("MXPIPE_LIBRARY")
    if prebuilt:
        return Path(prebuilt)
    manifest = REPO / "Cargo.toml"
    if not manifest.exists():
        raise SystemExit(
            f"mxpipe: {manifest} not found; build from the mxpipe repository "
            "(pip install ./bindings/python) or set MXPIPE_LIBRARY"
        )
    command = [
        find_cargo(), "build", "--release", "--lib",
        "--manifest-path", str(manifest),
        "--message-format=json-render-diagnostics",
    ]
    print("mxpipe: " + " ".join(command), file=sys.stderr)
    # Compiler diagnostics go to stderr as usual; stdout carries the JSON that names the output.
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, check=True)
    wanted = LIBRARY_NAMES.get(sys.platform, "libmxpipe.so")
    for line in done.stdout.decode().splitlines():
        message = json.loads(line) if line.startswith("{") else {}
        if message.get("reason") == "compiler-artifact" and message["target"]["name"] == "mxpipe":
            for filename in message.get("filenames", []):
                if Path(filename).name == wanted:
                    return Path(filename)
    raise SystemExit(f"mxpipe: cargo did not report {wanted}")


class BuildPyWithRust(build_py):
    """build_py, plus the Rust library copied into the package."""

    def run(self) -> None:
        super().run()
        library = build_rust_library()
        target = Path(self.build_lib) / "mxpipe" / library.name
        target.parent.mkdir(parents=True, exist_ok=True)
        self.copy_file(str(library), str(target))
        strip(target)


def strip(library: Path) -> None:
    """Drops the symbol table and debug information (a few MB); exported symbols stay."""
    if sys.platform == "win32":
        return
    tool = os.environ.get("STRIP") or shutil.which("strip")
    if tool is None:
        print("mxpipe: strip not found; the library keeps its symbol table", file=sys.stderr)
        return
    flags = ["-x"] if sys.platform == "darwin" else ["--strip-unneeded"]
    subprocess.run([tool, *flags, str(library)], check=True)


class BdistWheelNoAbi(bdist_wheel):
    """A platform wheel that no CPython ABI ties to one Python version: py3-none-<platform>."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self) -> tuple:
        _, _, platform = super().get_tag()
        return "py3", "none", platform


class BinaryDistribution(Distribution):
    """The wheel holds a native library: mark it platform-specific."""

    def has_ext_modules(self) -> bool:
        return True


setup(
    cmdclass={"build_py": BuildPyWithRust, "bdist_wheel": BdistWheelNoAbi},
    distclass=BinaryDistribution,
)
