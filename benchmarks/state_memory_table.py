"""Per-device optimizer-state memory under FSDP for real Llama shapes, over AbstractMeshes.

Nothing is allocated: shapes come from jax.eval_shape, layouts from dj.state_shardings.
Run: JAX_PLATFORMS=cpu .venv/bin/python benchmarks/state_memory_table.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, AxisType

import dualopt_jax as dj


def llama(d: int, layers: int, ffn: int, vocab: int, kv: int, tied: bool) -> dict:
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  params = {
    "embed": s(vocab, d),
    "norm": s(d),
    "layers": {
      "wq": s(layers, d, d), "wk": s(layers, d, kv), "wv": s(layers, d, kv),
      "wo": s(layers, d, d), "w1": s(layers, d, ffn), "w3": s(layers, d, ffn),
      "w2": s(layers, ffn, d), "n1": s(layers, d), "n2": s(layers, d),
    },
  }
  if not tied:
    params["lm_head"] = s(d, vocab)
  return params


MODELS = {
  "Llama-3.2-1B": llama(2048, 16, 8192, 128256, 512, True),
  "Llama-2-7B": llama(4096, 32, 11008, 32000, 4096, False),
  "Llama-2-70B": llama(8192, 80, 28672, 32000, 1024, False),
}


def per_device_gib(tx: optax.GradientTransformation, params: dict, shardings: dict) -> float:
  abstract = jax.eval_shape(tx.init, params)
  layout = dj.state_shardings(tx, params, shardings)
  total = sum(
    int(np.prod(sh.shard_shape(x.shape))) * x.dtype.itemsize
    for x, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(layout), strict=True)
  )
  return total / 2**30


def main() -> None:
  methods = {
    "adamw": lambda: optax.adamw(1e-4),
    "finetune f32 anchor": lambda: dj.dualopt(1e-4, stacked="layers"),
    "finetune bf16 anchor": lambda: dj.dualopt(1e-4, stacked="layers", anchor_dtype=jnp.bfloat16),
    "scratch": lambda: dj.dualopt(1e-4, mode="scratch", stacked="layers"),
  }
  print(f"{'model':14} {'params':>8} {'D':>4} " + " ".join(f"{m:>21}" for m in methods))
  for name, params in MODELS.items():
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    for devices in (8, 64, 256):
      mesh = AbstractMesh((devices,), ("data",), axis_types=(AxisType.Auto,))
      shardings = dj.fsdp_shardings(params, mesh, "data")
      cells = [per_device_gib(make(), params, shardings) for make in methods.values()]
      print(f"{name:14} {n / 1e9:7.2f}B {devices:4d} " + " ".join(f"{c:17.3f} GiB" for c in cells))


if __name__ == "__main__":
  main()
