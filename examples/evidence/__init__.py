"""Evidence benchmarks for dualopt_jax: the papers' claims measured at small scale.

Modules:

* ``data``      -- scikit-learn digits splits and Python-shipped text corpora (no downloads).
* ``models``    -- a small Flax Linen CNN and a tiny char-level causal Transformer.
* ``methods``   -- the registry of optimizers compared, built with the public ``dualopt_jax`` API.
* ``train``     -- a training loop vectorized over (hyper-parameter, seed) with ``jax.vmap``.
* ``stats``     -- validation-based selection, mean +- std, table formatting, JSON/CSV output.
* ``plots``     -- matplotlib (Agg) figures.
* ``vision``    -- transfer benchmark on digits 0-4 -> 5-9.
* ``language``  -- transfer benchmark stdlib source -> pydoc topics prose.
* ``scratch``   -- from-scratch benchmark and the layer-wise decay ablation.
* ``runner``    -- the comparison protocol (same budget, base lr from Adam, validation choice).
* ``run_all``   -- CLI for the full grids: ``python -m examples.evidence.run_all all``.
* ``summarize`` -- paired-by-seed differences against the reference method.
"""
