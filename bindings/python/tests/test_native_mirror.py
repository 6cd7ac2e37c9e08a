"""The ctypes declarations in mxpipe._native must mirror include/mxpipe.h: every constant and
result code, every function's parameter count, and the layout of every struct (each field's
offset and the size, as a C compiler lays them out, against ctypes)."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mxpipe import _native as n

HEADER = Path(__file__).resolve().parents[3] / "include" / "mxpipe.h"


@pytest.fixture(scope="module")
def header() -> str:
    # Comments out: /* */ (the header's style) and // (in case).
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def test_constants_and_result_codes(header):
    defines = dict(re.findall(r"#define (MXP_\w+) (\d+)", header))
    assert defines, "no MXP_ constants found in the header"
    for name, value in defines.items():
        assert getattr(n, name) == int(value), name
    codes = dict(re.findall(r"\b(MXP_(?:OK|ERR_\w+)) = (\d+)", header))
    assert "MXP_ERR_TIMED_OUT" in codes
    for name, value in codes.items():
        assert getattr(n, name) == int(value), name
    categories = re.findall(r"\bMXP_CATEGORY_(\w+) = (\d+)", header)
    assert [(name.lower(), int(v)) for name, v in categories] == [
        (name or "none", i) for i, name in enumerate(n.CATEGORIES)
    ]


def test_every_declared_function_has_the_header_parameter_count(header):
    declared = {
        name: params
        for name, params in re.findall(r"\b(mxp_\w+)\(([^)]*)\);", header)
    }
    for name, (_, argtypes) in n._PROTOTYPES.items():
        assert name in declared, f"{name} is not in the header"
        params = declared[name].strip()
        count = 0 if params in ("", "void") else params.count(",") + 1
        assert len(argtypes) == count, name


@pytest.mark.parametrize("struct", [n.Event, n.Stats])
def test_struct_layout_matches_the_compiler(struct, tmp_path):
    cc = shutil.which("cc")
    if cc is None:
        pytest.fail("cc is needed to lay the header's structs out")
    c_name = {n.Event: "mxp_event", n.Stats: "mxp_stats"}[struct]
    fields = [name for name, *_ in struct._fields_]
    lines = [f'printf("size %zu\\n", sizeof({c_name}));']
    lines += [f'printf("{f} %zu\\n", offsetof({c_name}, {f}));' for f in fields]
    source = tmp_path / "layout.c"
    source.write_text(
        "#include <stddef.h>\n#include <stdio.h>\n#include \"mxpipe.h\"\n"
        "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n"
    )
    subprocess.run([cc, "-I", str(HEADER.parent), "-o", str(tmp_path / "layout"), str(source)],
                   check=True)
    out = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True)
    layout = dict(line.split() for line in out.stdout.splitlines())
    assert int(layout.pop("size")) == ctypes.sizeof(struct)
    assert {f: int(v) for f, v in layout.items()} == {
        f: getattr(struct, f).offset for f in fields
    }
    # Every field of the C struct is mirrored (none missing at the end).
    body = re.search(r"typedef struct %s \{(.*?)\} %s;" % (c_name, c_name),
                     HEADER.read_text(), re.S)
    assert body is not None
    c_fields = re.findall(r"(\w+)(?:\[\w+\])?;", re.sub(r"/\*.*?\*/|//[^\n]*", "", body.group(1),
                                                     flags=re.S))
    assert c_fields == fields
