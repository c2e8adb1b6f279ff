"""Every ```python block of every docs/*.md runs: each file's blocks in order, in one shared namespace,
in a temporary working directory. Blocks fenced as anything else (```text, ```bash, ...) are not run."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")
RUN_LANGS = {"python", "py"}


def code_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(first code line number (1-based), language, code)`` of each fenced block, in order.

    Follows CommonMark: a block closes at a fence of the same character at least as long; fences may be
    indented (e.g. inside list items), and the block's code is dedented by that indentation.
    """
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        lang = (m["info"].split() or [""])[0].lower()
        body, j = [], i + 1
        while j < len(lines):
            close = FENCE.match(lines[j])
            if close and not close["info"] and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence):
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        blocks.append((i + 2, lang, textwrap.dedent("\n".join(body)) + "\n"))
        i = j + 1
    return blocks


def python_blocks(path: Path) -> list[tuple[int, str]]:
    return [(line, code) for line, lang, code in code_blocks(path.read_text()) if lang in RUN_LANGS]


DOC_FILES = sorted(DOCS.rglob("*.md"))


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A temporary cwd, and torch's global settings restored afterwards."""
    monkeypatch.chdir(tmp_path)
    dtype, grad, threads = torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_num_threads()
    rng = torch.get_rng_state()
    yield tmp_path
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


@pytest.mark.parametrize("doc", DOC_FILES, ids=[str(p.relative_to(DOCS)) for p in DOC_FILES])
def test_doc_python_blocks_run(doc: Path, isolated):
    blocks = python_blocks(doc)
    namespace: dict = {"__name__": "__main__", "__file__": str(doc)}
    for line, code in blocks:
        # leading newlines make tracebacks point at the line in the .md file
        compiled = compile("\n" * (line - 1) + code, str(doc), "exec")
        try:
            exec(compiled, namespace)
        except Exception as e:
            raise AssertionError(f"{doc.name}: the python block starting at line {line} failed: "
                                 f"{type(e).__name__}: {e}") from e


def test_hooks_page_exists_and_has_python_blocks():
    assert (DOCS / "hooks.md") in DOC_FILES
    assert len(python_blocks(DOCS / "hooks.md")) >= 5


def test_code_block_parser():
    text = textwrap.dedent("""\
        intro
        ```python
        a = 1
        ```
        ```text
        not code
        ```
        - item

          ```python title="x"
          b = a + 1
          if b:
              c = b
          ```
        ~~~~bash
        echo hi
        ```
        still bash
        ~~~~
        ````py
        ```python
        ````
        """)
    blocks = code_blocks(text)
    assert [(line, lang) for line, lang, _ in blocks] == [(3, "python"), (6, "text"), (11, "python"),
                                                         (16, "bash"), (21, "py")]
    assert blocks[2][2] == "b = a + 1\nif b:\n    c = b\n"
    assert blocks[3][2] == "echo hi\n```\nstill bash\n"
    assert blocks[4][2] == "```python\n"
