"""The package under ``mypy --strict``, as a user's type checker sees it (py.typed): correct use
passes, a misspelt setting or a value of the wrong type is reported, and outcomes are typed
(``enhanced`` a tuple of three ints or None, ``category`` a Category or None)."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import mypy  # noqa: F401 - tests/run.sh installs it into tests/.venv
import pytest

import mxpipe

GOOD = """
    import asyncio
    from datetime import timedelta
    from typing import Optional, Tuple
    import mxpipe

    def report(outcome: mxpipe.Outcome) -> str:
        enhanced: Optional[Tuple[int, int, int]] = outcome.enhanced
        category: Optional[mxpipe.Category] = outcome.category
        return f"{outcome.kind.value} {enhanced} {category} {outcome.tag}"

    with mxpipe.Dispatcher(relay="127.0.0.1:2525", max_connections_per_destination=8,
                           connect_timeout=timedelta(seconds=5), starttls="required",
                           limit_override=[".example.com: max_connections=2"]) as d:
        d.send("a@example.org", ["b@example.net"], b"x", tag=7)
        for outcome in d.poll():
            print(report(outcome))
        clean: bool = d.shutdown(timeout=1.5)

    async def main() -> None:
        async with mxpipe.AsyncDispatcher(relay="127.0.0.1:2525", loops=1) as a:
            outcomes = await a.send("a@example.org", "b@example.net", b"x")
            print([report(o) for o in outcomes])

    asyncio.run(main())
"""


def mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    path = tmp_path / "user.py"
    path.write_text(textwrap.dedent(source))
    # The package these tests import: installed (mypy finds it), or a source tree on
    # PYTHONPATH, which mypy does not read.
    env = dict(os.environ)
    where = str(Path(mxpipe.__file__).resolve().parents[1])
    if where not in {str(Path(p).resolve()) for p in site.getsitepackages()}:
        env["MYPYPATH"] = where
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(path)],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )


def test_correct_use_passes_strict(tmp_path):
    done = mypy(tmp_path, GOOD)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    "call, complaint",
    [
        ('mxpipe.Dispatcher(relay="h:25", max_conections_per_destination=8)',
         '"max_conections_per_destination"'),
        ('mxpipe.Dispatcher(relay="h:25", loops="two")', '"loops"'),
        ('mxpipe.Dispatcher(relay="h:25", starttls="always")', '"starttls"'),
        ('mxpipe.AsyncDispatcher(relay="h:25", conect_timeout=5)', '"conect_timeout"'),
    ],
)
def test_a_misspelt_or_mistyped_setting_is_reported(tmp_path, call, complaint):
    done = mypy(tmp_path, f"import mxpipe\n{call}\n")
    assert done.returncode == 1, done.stdout
    assert complaint in done.stdout, done.stdout
