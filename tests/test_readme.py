"""The README's quickstart runs as written (a shorter training loop), and finds units to go."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart() -> str:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_quickstart_runs():
    code = _quickstart()
    assert "range(30)" in code
    scope: dict = {}
    exec(compile(code.replace("range(30)", "range(3)"), str(README), "exec"), scope)
    result, small = scope["result"], scope["small"]
    assert result.summary()
    assert sum(p.numel() for p in small.parameters()) > 0
