"""The documentation's guides run as written, and the API page lists exactly the public names.

These read the Markdown sources; none needs Sphinx. Building the site (``make docs``) is the
last test, marked slow and skipped where Sphinx is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dualopt_jax
from tests._markdown import python_blocks, run_page

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDES = sorted((DOCS / "guides").glob("*.md"))
# ``.. autofunction:: name`` (reST inside {eval-rst}) or ```{autofunction} name (MyST).
_ENTRY = re.compile(r"(?:\.\. |\{)auto(?:function|class)(?:::|\})\s+([\w.]+)")


def _entries() -> list[str]:
  return [name for page in DOCS.rglob("*.md") for name in _ENTRY.findall(page.read_text())]


def test_every_guide_has_code() -> None:
  assert len(GUIDES) == 8
  for page in GUIDES:
    assert python_blocks(page), f"{page.name} has no python block"


@pytest.mark.parametrize("page", GUIDES, ids=lambda p: p.stem)
def test_guide_runs(page: Path) -> None:
  for block in python_blocks(page):  # only the library, JAX and its ecosystem, and NumPy
    for module in re.findall(r"^\s*(?:import|from)\s+([\w.]+)", block, re.MULTILINE):
      assert module.split(".")[0] in {"jax", "optax", "flax", "numpy", "dualopt_jax", "orbax",
                                       "os", "tempfile"}, (page.name, module)
  run_page(page)


def test_index_example_runs(capsys) -> None:
  run_page(DOCS / "index.md")
  assert "rollback/step" in capsys.readouterr().out


def test_api_page_lists_every_public_name_once() -> None:
  entries = _entries()
  public = [name for name in entries if "." not in name]
  assert sorted(public) == sorted(dualopt_jax.__all__)  # every export, and nothing else
  assert len(public) == len(set(public))


def test_api_page_private_entries_are_return_types_of_public_functions() -> None:
  # A class a public function returns but the package does not export (``describe``'s
  # LayerTable) is documented by its module path, so that the signature's reference resolves.
  for name in (n for n in _entries() if "." in n):
    module, _, attr = name.rpartition(".")
    assert attr not in dualopt_jax.__all__, name
    cls = getattr(importlib.import_module(module), attr)
    returned = [f for f in map(dualopt_jax.__dict__.get, dualopt_jax.__all__)
                if callable(f) and getattr(f, "__annotations__", {}).get("return") == attr]
    assert returned and isinstance(cls, type), name


def test_index_has_the_readme_commands() -> None:
  index = (DOCS / "index.md").read_text()
  for command in ("make demo", "make test"):
    assert command in index
  for page in GUIDES:
    assert f"guides/{page.stem}" in index, f"{page.name} is not in the toctree"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("sphinx") is None, reason="sphinx is not installed")
@pytest.mark.skipif(importlib.util.find_spec("furo") is None, reason="furo is not installed")
def test_site_builds_without_warnings(tmp_path: Path) -> None:
  out = tmp_path / "html"
  result = subprocess.run(
    [sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going", "-q", "-b", "html",
     str(DOCS), str(out)], capture_output=True, text=True, cwd=ROOT, check=False,
  )
  assert result.returncode == 0, result.stderr
  assert (out / "index.html").exists() and (out / "api.html").exists()
  shutil.rmtree(out)
