"""The documentation: the README stays a newcomer's page, and docs/ builds as a site.

The README keeps only what a newcomer needs (the two set-up commands, the recipe table, a quick
start, multi-GPU, links); everything else lives in docs/. `mkdocs build --strict` fails on a
broken link or anchor, a missing included recipe YAML (the recipe pages include recipes/*.yaml
verbatim) or a page left out of the nav (mkdocs.yml sets those validations to warnings, which
--strict turns into errors). The nav check below is repeated without mkdocs so that an orphaned
page is caught even where mkdocs is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 250


def _nav_pages(nav) -> list[str]:
    """Every page path in a mkdocs nav (strings, {title: path} and {title: [children]})."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    return []


def test_readme_is_short_and_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    n_lines = len(text.splitlines())
    assert n_lines <= README_MAX_LINES, (
        f"README.md has {n_lines} lines (at most {README_MAX_LINES}): move detail into docs/"
    )
    for command in ("make demo", "make test"):
        assert command in text, f"README.md must show `{command}`"


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    in_nav = set(_nav_pages(config.get("nav") or []))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages, "docs/ has no pages"
    assert not pages - in_nav, f"docs pages missing from mkdocs.yml's nav: {sorted(pages - in_nav)}"
    assert not in_nav - pages, f"nav entries with no page in docs/: {sorted(in_nav - pages)}"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason='mkdocs is not installed (pip install -e ".[docs]")')
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # a Material end-of-life banner, not a finding
    # cwd is the repository root: the recipe pages include recipes/*.yaml relative to it.
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()
