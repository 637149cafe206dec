"""The pinned requirement files agree with pyproject.toml.

``requirements/min.txt`` pins every runtime dependency at exactly its declared lower bound
(what ``make test-min`` installs); ``requirements/lock.txt`` (``make lock``) satisfies every
declared range.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent


def _project() -> dict:
  with open(ROOT / "pyproject.toml", "rb") as f:
    return tomllib.load(f)["project"]


def _pins(name: str) -> dict[str, Version]:
  pins = {}
  for line in (ROOT / "requirements" / name).read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    req = Requirement(line)
    (spec,) = req.specifier
    assert spec.operator == "==", f"{name}: {line!r} is not an exact pin"
    pins[canonicalize_name(req.name)] = Version(spec.version)
  return pins


def _lower_bound(req: Requirement) -> Version:
  bounds = [Version(s.version) for s in req.specifier if s.operator == ">="]
  assert len(bounds) == 1, f"pyproject: {req} needs exactly one '>=' lower bound"
  return bounds[0]


def test_min_pins_are_the_declared_lower_bounds() -> None:
  declared = {
    canonicalize_name(r.name): _lower_bound(r) for r in map(Requirement, _project()["dependencies"])
  }
  assert _pins("min.txt") == declared


def test_lock_satisfies_every_declared_range() -> None:
  project = _project()
  lock = _pins("lock.txt")
  declared = list(project["dependencies"])
  for extra in ("test", "examples", "docs"):
    declared += project["optional-dependencies"][extra]
  for req in map(Requirement, declared):
    name = canonicalize_name(req.name)
    assert name in lock, f"lock.txt lacks {req.name} (run `make lock`)"
    assert req.specifier.contains(lock[name], prereleases=True), (
      f"lock.txt pins {req.name}=={lock[name]}, outside pyproject's {req.specifier}"
    )


def test_lock_has_no_torch() -> None:
  heavy = [name for name in _pins("lock.txt") if name == "torch" or name.startswith("nvidia-")]
  assert heavy == []
