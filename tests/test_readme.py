"""README's library example runs as written (extracted from README.md, not copied)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## The library", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "from dhr_cli import" in code and len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    n, miou = re.fullmatch(r"(\d+) masks, mIoU ([\d.]+)\n", capsys.readouterr().out).groups()
    assert int(n) == 8 and 0 < float(miou) <= 1
    assert (tmp_path / "masks.h5").is_file()
