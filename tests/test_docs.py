"""The documentation cannot rot: every fenced ```python block of README.md, docs/getting-started.md and
docs/models/embedders.md runs against the bundled all-MiniLM-L6-v2, and the README keeps CI's set-up command and its length limit.

A page's blocks run in order in one namespace, as a reader pasting them into one interpreter would. A
block that needs a GPU, a server or a download is preceded by ``<!-- skip -->`` (and the text says why).
``mkdocs build --strict`` (in .ci/run) checks the site itself: links, anchors, the generated pages.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = "<!-- skip -->"
FENCE = re.compile(r"^```(\w*)\s*$")


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(1-based line of the opening fence, code, skipped) for each ```python block at column 0."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if m.group(1) == "python":
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            blocks.append((i + 1, "\n".join(lines[i + 1:end]) + "\n", before == SKIP))
        i = end + 1
    return blocks


def run_page(path: Path) -> int:
    """Run the page's blocks (not the skipped ones) in the current directory; return how many ran."""
    namespace: dict = {"__name__": "__main__"}
    ran = 0
    for line, code, skipped in python_blocks(path.read_text("utf-8")):
        if skipped:
            continue
        try:
            exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{path.name}: the python block at line {line} failed: {e!r}") from e
        ran += 1
    return ran


def test_readme_examples_run(tmp_path, monkeypatch):
    """The README's blocks export the bundled model themselves (into the temporary working directory)."""
    monkeypatch.chdir(tmp_path)
    assert run_page(ROOT / "README.md") >= 1
    assert (tmp_path / "artifacts" / "all-MiniLM-L6-v2" / "manifest.json").exists()


@pytest.mark.parametrize("page, blocks", [("docs/getting-started.md", 4), ("docs/models/embedders.md", 1)])
def test_page_examples_run(page, blocks, minilm_art, tmp_path, monkeypatch):
    """These pages' blocks come after a `bgert export` step: the session's export stands in for it."""
    shutil.copytree(minilm_art, tmp_path / "artifacts" / "all-MiniLM-L6-v2")
    monkeypatch.chdir(tmp_path)
    assert run_page(ROOT / page) >= blocks


def test_a_broken_block_fails_and_a_skipped_one_does_not_run(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nx = 1\n```\n\n" + SKIP + "\n```python\nraise SystemExit('skipped ran')\n```\n"
                    "\n```bash\nfalse\n```\n\n```python\nassert x == 2, 'wrong'\n```\n", encoding="utf-8")
    assert [(line, skipped) for line, _, skipped in python_blocks(page.read_text())] == [(3, False), (8, True),
                                                                                         (16, False)]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match=r"page.md: the python block at line 16 failed: AssertionError\('wrong'\)"):
        run_page(page)


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md", "docs/models/embedders.md"])
def test_every_skip_marker_precedes_a_python_block(page):
    lines = (ROOT / page).read_text("utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.strip() == SKIP:
            follows = next(x for x in lines[i + 1:] if x.strip())
            assert follows.strip() == "```python", f"{page}:{i + 1}: {SKIP} is not followed by a python block"


def test_readme_is_short_and_keeps_ci_commands():
    readme = (ROOT / "README.md").read_text("utf-8")
    assert len(readme.splitlines()) <= 200
    ci = (ROOT / ".ci" / "run").read_text()
    install = re.search(r'^pip install -q (-c constraints.txt -e "\.\[[a-z,]+\]")$', ci, re.M)
    assert install, "the install line of .ci/run changed shape; keep README.md and .ci/run in sync"
    assert re.search(r"^(\w+=\S+ )*mkdocs build --strict$", ci, re.M) and "\npython -m pytest" in ci
    test_command = (f"python3 -m venv .venv && . .venv/bin/activate && pip install {install.group(1)} && "
                    "bash scripts/make_triton_env.sh && mkdocs build --strict && python -m pytest -q")
    for page in (readme, (ROOT / "docs" / "getting-started.md").read_text("utf-8")):  # the two set-up commands
        assert test_command in page
        assert 'pip install -c constraints.txt -e ".[export,bench]" && bgert demo' in page
