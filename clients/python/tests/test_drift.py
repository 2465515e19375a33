"""The checked-in stubs are what tools/generate.py makes from the proto now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
CHECKED_IN = HERE / "src" / "shapeblock_hub" / "_generated"


def test_the_checked_in_stubs_are_what_the_proto_generates(tmp_path: Path) -> None:
    out = tmp_path / "generated"
    subprocess.run(
        [sys.executable, str(HERE / "tools" / "generate.py"), "--out", str(out)], check=True
    )
    fresh = sorted(p.name for p in out.iterdir())
    assert fresh == sorted(p.name for p in CHECKED_IN.iterdir() if p.is_file())
    stale = [n for n in fresh if (out / n).read_bytes() != (CHECKED_IN / n).read_bytes()]
    assert not stale, f"{stale} differ from the proto: run `python tools/generate.py`"
