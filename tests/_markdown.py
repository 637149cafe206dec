"""Code blocks of a Markdown page: what the README and docs tests execute."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks(path: Path) -> list[str]:
  """Every ```python block of the page, in order."""
  return [body for lang, body in _FENCE.findall(path.read_text()) if lang == "python"]


def python_block_after(path: Path, heading: str) -> str:
  """The first ```python block after ``heading``."""
  text = path.read_text()
  start = text.index("```python", text.index(heading)) + len("```python")
  return text[start : text.index("```", start)]


def run_page(path: Path) -> dict:
  """Executes the page's python blocks in order in one namespace; returns the namespace.

  The namespace is a module's, registered in ``sys.modules`` while it runs: dataclasses (Flax
  Linen modules with fields) look their module up there.
  """
  module = types.ModuleType(f"_docs_page_{path.stem}")
  sys.modules[module.__name__] = module
  try:
    for i, block in enumerate(python_blocks(path)):
      exec(compile(block, f"{path}:block{i}", "exec"), module.__dict__)  # noqa: S102
  finally:
    del sys.modules[module.__name__]
  return module.__dict__
