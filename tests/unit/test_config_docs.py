"""The README's MoEConfig reference is generated from moe_dist/config.py (`field_docs`) and must
match it: a field added, removed, renamed, re-typed, re-defaulted or re-documented without
regenerating the table (`python -m moe_dist.config --update-readme`) fails here."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from moe_dist import MoEConfig
from moe_dist.config import README_BEGIN, README_END, field_docs, readme_block

ROOT = Path(__file__).resolve().parents[2]


def test_every_field_is_documented_in_declaration_order():
    docs = field_docs()
    assert list(docs) == [f.name for f in fields(MoEConfig)]
    for f in fields(MoEConfig):
        d = docs[f.name]
        assert d["doc"], f"MoEConfig.{f.name} has no comment: add one on its line in config.py"
        want = "required" if f.default is MISSING else repr(f.default)
        assert d["default"] == want, (f.name, d["default"], want)


def test_readme_table_matches_the_dataclass():
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(README_BEGIN), readme.index(README_END) + len(README_END)
    assert (
        readme[start:end] == readme_block()
    ), "README's MoEConfig table is stale: run python -m moe_dist.config --update-readme"


def test_update_readme_rewrites_only_the_table(tmp_path):
    stale = f"# x\n\nbefore\n\n{README_BEGIN}\n| old | table |\n{README_END}\n\nafter\n"
    (tmp_path / "README.md").write_text(stale)
    subprocess.run(
        [sys.executable, "-m", "moe_dist.config", "--update-readme", str(tmp_path / "README.md")],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    text = (tmp_path / "README.md").read_text()
    assert text == f"# x\n\nbefore\n\n{readme_block()}\n\nafter\n"
    for name in ("hidden_size", "transport", "error_check"):
        assert f"| `{name}` |" in text
