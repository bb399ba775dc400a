"""The repository explains itself: every docs/*.md the code, tests and README cite exists in it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cited_docs_exist_and_nothing_cites_outside_the_repository():
    cited, outside = set(), []
    for path in [ROOT / "README.md", *ROOT.glob("dhr_cli/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]:
        text = path.read_text()
        cited.update(re.findall(r"docs/[a-z_]+\.md", text))
        if path.name != "test_docs.py":
            outside += [f"{path.name}: {m}" for m in re.findall(r"\.\./shared|\b(?:METHOD|CONTRACTS|PEERS)\.md", text)]
    assert {"docs/method.md", "docs/contracts.md", "docs/peers.md"} <= cited
    assert all((ROOT / c).is_file() for c in cited), sorted(c for c in cited if not (ROOT / c).is_file())
    assert not outside
