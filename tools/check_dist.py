"""Checks the built wheel and sdist: the package and py.typed are in, tests and results are out.

Usage: ``python tools/check_dist.py dist``.
"""

from __future__ import annotations

import sys
import tarfile
import zipfile
from pathlib import Path

FORBIDDEN = ("tests/", "results/", "examples/", "benchmarks/", ".ci/")
REQUIRED = ("dualopt_jax/__init__.py", "dualopt_jax/py.typed")


def _names(archive: Path) -> list[str]:
  if archive.suffix == ".whl":
    with zipfile.ZipFile(archive) as z:
      return z.namelist()
  with tarfile.open(archive) as t:
    # sdist members are "<name>-<version>/<path>"; compare the paths inside.
    return [m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name]


def check(archive: Path) -> list[str]:
  """Returns the problems found in one archive."""
  names = _names(archive)
  problems = [f"{archive.name}: missing {r}" for r in REQUIRED if r not in names]
  problems += [f"{archive.name}: contains {n}" for n in names if n.startswith(FORBIDDEN)]
  return problems


def main(dist: str) -> int:
  """Checks the one wheel and one sdist in ``dist``; returns the exit status."""
  archives = sorted(Path(dist).glob("*.whl")) + sorted(Path(dist).glob("*.tar.gz"))
  if len(archives) != 2:
    print(f"expected one wheel and one sdist in {dist}, found {[a.name for a in archives]}")
    return 1
  problems = [p for a in archives for p in check(a)]
  for p in problems:
    print(p)
  if not problems:
    print("dist ok:", ", ".join(a.name for a in archives))
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
