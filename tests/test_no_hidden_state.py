"""No hidden state: nothing in the package remembers what ran before.

Depths are a pure function of the tree's paths, shapes and settings; a module
level cache, registry or context variable would make a result depend on what
ran earlier in the process (the old design had three). These tests run a
workload that touches every entry point, then look at every module attribute,
and compare depths computed here with depths computed in a fresh process after
other calls in another order.
"""

from __future__ import annotations

import collections
import contextvars
import importlib
import json
import pkgutil
import subprocess
import sys
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import dualopt_jax as dj
from dualopt_jax import _depths, _paths

REPO = Path(__file__).resolve().parents[1]
_MUTABLE = (dict, list, set, bytearray, collections.deque, contextvars.ContextVar,
            weakref.WeakKeyDictionary, weakref.WeakValueDictionary, weakref.WeakSet)


def _modules():
  names = [m.name for m in pkgutil.iter_modules(dj.__path__, "dualopt_jax.")]
  return [importlib.import_module(n) for n in ["dualopt_jax", *names]]


def _workload() -> None:
  params = {"embed": {"embedding": jnp.ones((5, 2))},
            "layers": {str(i): {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)} for i in range(3)},
            "head": {"kernel": jnp.ones((2, 3))}}
  grads = jax.tree.map(jnp.ones_like, params)
  txs = [
    dj.dualopt(1e-2, head="head"), dj.dualopt(1e-2, mode="scratch"),
    dj.olor(1e-2, order=dj.forward_order(
      lambda p, x: x @ p["layers"]["0"]["kernel"] @ p["layers"]["1"]["kernel"]
      @ p["layers"]["2"]["kernel"] + p["embed"]["embedding"][0] @ p["head"]["kernel"][:, :2]
      + p["layers"]["0"]["bias"] + p["layers"]["1"]["bias"] + p["layers"]["2"]["bias"],
      params, jnp.ones((1, 2)))),
    optax.partition({"a": dj.dualopt(1e-2), "b": optax.adam(1e-2)},
                    lambda p: jax.tree.map(lambda _: "a", p)),
    optax.chain(optax.adam(1e-2), dj.project_to_anchor(0.1, layer_scale=dj.LayerProfile())),
    optax.chain(optax.scale_by_adam(), dj.layerwise_lr_decay(0.8),
                optax.scale_by_learning_rate(1e-2)),
  ]
  for tx in txs:
    state = jax.jit(tx.init)(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    dj.describe(params, state)
    dj.drift(params, state, params0=params)
  dj.layer_depths(params, granularity="tensor", order=["embed", "layers", "head"])


def test_no_module_attribute_is_a_cache_registry_or_context_variable() -> None:
  _workload()
  found = []
  for module in _modules():
    for name, value in vars(module).items():
      if name.startswith("__") and name.endswith("__"):
        continue
      if isinstance(value, _MUTABLE) or hasattr(value, "cache_info"):
        found.append(f"{module.__name__}.{name}: {type(value).__name__}")
  assert not found, "module-level mutable state: " + ", ".join(found)


_FRESH = """
import json, sys
import jax, jax.numpy as jnp
import dualopt_jax as dj
from dualopt_jax import _depths, _paths
sys.path.insert(0, sys.argv[1])
from tests import test_no_hidden_state as t
out = {}
for name, tree in reversed(t.trees()):  # another order than the parent process
  dj.dualopt(1e-2).init(jax.tree.map(lambda x: x, tree))
  out[name] = t.table(tree)
print(json.dumps(out))
"""


def trees() -> list[tuple[str, dict]]:
  """Trees whose sorted key order is not their forward order."""
  w = lambda *s: jnp.ones(s or (2,))  # noqa: E731
  return [
    ("digits", {"h": {str(i): {"w": w()} for i in (0, 1, 2, 10, 11)}, "wte": {"embedding": w(3, 2)},
                "ln_f": {"scale": w()}}),
    ("towers", {"encoder": {"block": {"0": {"w": w()}}, "final_layer_norm": {"weight": w()}},
                "decoder": {"block": {"0": {"w": w()}}}, "shared": {"embedding": w(3, 2)}}),
    ("cnn", {"Dense_0": {"kernel": w(2, 2), "bias": w()}, "Conv_1": {"kernel": w(2, 2)},
             "Conv_0": {"kernel": w(2, 2), "bias": w()}, "head": {"kernel": w(2, 2)}}),
  ]


def table(tree) -> dict[str, list[float]]:
  return {
    _paths.path_str(p): jnp.ravel(jnp.asarray(d)).tolist()
    for granularity in ("block", "tensor")
    for p, d in _depths.depth_table(tree, granularity=granularity).items()
  } | {"tensor:" + _paths.path_str(p): jnp.ravel(jnp.asarray(d)).tolist()
       for p, d in _depths.depth_table(tree, granularity="tensor").items()}


def test_the_same_tree_in_any_key_order_gives_the_same_depths_in_a_fresh_process() -> None:
  _workload()
  here = {}
  for name, tree in trees():
    reordered = {k: tree[k] for k in sorted(tree, reverse=True)}
    assert table(reordered) == table(tree) == table(jax.tree.map(lambda x: x, tree)), name
    here[name] = table(tree)
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
  proc = subprocess.run([sys.executable, "-c", _FRESH, str(REPO)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == here
