"""Fresh-process half of the contract's Orbax context (``tests/_contexts.py``).

``python -m tests._contract_worker MODULE:CASES CHECKPOINT_DIR OUT.pkl``: restores every case's
``{'params', 'state'}`` checkpoint (saved after step 1) into ``dj.abstract_state(tx, params)``,
runs the remaining steps and pickles the final params and ``describe`` rows per case.
"""

import os
import pickle
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(source: str, directory: str, out: str) -> None:
  from tests import _contexts

  results = _contexts.restore_and_finish(_contexts.load_cases(source), Path(directory))
  Path(out).write_bytes(pickle.dumps(results))


if __name__ == "__main__":
  main(*sys.argv[1:])
