"""Sphinx configuration for the dualopt_jax documentation (``make docs``).

The build must not touch the network, so there is no intersphinx: references to
other projects' types (JAX, Optax, Flax, NumPy, typing, the standard library)
cannot resolve and are listed in ``nitpick_ignore_regex`` below. Every reference
to a name of this library must resolve (``sphinx-build -W -n``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import chex  # noqa: E402
import optax  # noqa: E402

import dualopt_jax  # noqa: E402

project = "dualopt_jax"
author = "dualopt_jax authors"
copyright = "2026, dualopt_jax authors"  # noqa: A001
release = version = dualopt_jax.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  # MathJax served from the built site instead of a CDN: equations render offline.
  "sphinx-mathjax-offline",
  "myst_parser",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "check_site.py"]

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"exclude-members": "count, index, _asdict, _make, _replace, _fields, "
                                              "_field_defaults"}

html_theme = "furo"
html_title = f"dualopt_jax {release}"
# MathJax (the equations) is the only thing a page loads from elsewhere: from its CDN, in the
# reader's browser, never at build time. Offline, equations show as their TeX source.

# --- references that cannot resolve without intersphinx ---------------------------------------
# Only other projects' names (JAX, jaxlib, Optax, Flax, chex, NumPy, typing / collections.abc);
# Sphinx itself resolves Python's builtins. A name of this library is never ignored.
_EXTERNAL = (
  r"(jax|jaxlib|optax|flax|chex|numpy)\..+",  # e.g. optax.Params, jax.sharding.Mesh, numpy.ndarray
  r"(typing|collections\.abc)\..+",  # Callable, Sequence, ...
  r"ScalarOrSchedule",  # optax.ScalarOrSchedule, imported by name in the annotations
)
nitpick_ignore_regex = [(r"py:(class|obj|data|func|meth|attr)", p) for p in _EXTERNAL]


# --- Optax's and chex's aliases by name ---------------------------------------------------------
# Annotations such as ``optax.ScalarOrSchedule`` are evaluated into long unions; show the alias
# instead. (``autodoc_type_aliases`` cannot: Sphinx leaves an alias inside ``X | None``
# unresolved.)
_ALIASES = {"optax.ScalarOrSchedule": optax.ScalarOrSchedule, "optax.Params": optax.Params,
            "optax.OptState": optax.OptState, "chex.Array": chex.Array}


def _named_aliases(app, what, name, obj, options, signature, return_annotation):
  """Replaces each alias's expansion in a signature by the alias's name."""
  from sphinx.util.typing import stringify_annotation

  for alias, value in _ALIASES.items():
    for mode in ("smart", "fully-qualified-except-typing", "fully-qualified"):
      expanded = stringify_annotation(value, mode)
      if signature:
        signature = signature.replace(expanded, alias)
      if return_annotation:
        return_annotation = return_annotation.replace(expanded, alias)
  return signature, return_annotation


def setup(app):
  """Registers the signature rewrite."""
  app.connect("autodoc-process-signature", _named_aliases)
