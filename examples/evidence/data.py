"""Data that ships with the installed packages: no downloads at run time."""

from __future__ import annotations

import dataclasses
import os
import sysconfig

import numpy as np

VOCAB = 128  # char-level: ASCII code points; anything else maps to '?'.


@dataclasses.dataclass(frozen=True)
class Split:
  x: np.ndarray
  y: np.ndarray


@dataclasses.dataclass(frozen=True)
class TransferData:
  """Upstream (pre-training) and downstream (fine-tuning) splits."""

  up_train: Split
  up_val: Split
  up_test: Split
  down_train: Split
  down_val: Split
  down_test: Split


def digits_transfer(
  *, down_train_per_class: int = 20, down_val_per_class: int = 20, split_seed: int = 0
) -> TransferData:
  """scikit-learn's 8x8 digits: upstream = digits 0-4, downstream = digits 5-9.

  Upstream is split 60/20/20 (train/val/test). Downstream is the few-shot
  side: ``down_train_per_class`` training images per class, the same number
  for validation, the rest (about 140 per class) for test. Labels of both
  tasks are 0..4. The split is fixed (``split_seed``); the benchmark's seeds
  vary initialisation and batch order.
  """
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]  # (N, 8, 8, 1)
  y = digits.target.astype(np.int32)
  rng = np.random.RandomState(split_seed)
  perm = rng.permutation(len(y))
  x, y = x[perm], y[perm]

  up = np.flatnonzero(y < 5)
  n = len(up)
  a, b = int(0.6 * n), int(0.8 * n)
  up_train, up_val, up_test = up[:a], up[a:b], up[b:]

  tr, va, te = [], [], []
  for c in range(5, 10):
    idx = np.flatnonzero(y == c)
    tr.append(idx[:down_train_per_class])
    va.append(idx[down_train_per_class:down_train_per_class + down_val_per_class])
    te.append(idx[down_train_per_class + down_val_per_class:])
  down_train, down_val, down_test = (np.sort(np.concatenate(s)) for s in (tr, va, te))

  def take(idx: np.ndarray, offset: int) -> Split:
    return Split(x[idx], y[idx] - offset)

  return TransferData(
    take(up_train, 0), take(up_val, 0), take(up_test, 0),
    take(down_train, 5), take(down_val, 5), take(down_test, 5),
  )


def encode(text: str) -> np.ndarray:
  data = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)
  return np.minimum(data, VOCAB - 1).astype(np.int32)


def _stdlib_modules() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  return [os.path.join(root, n) for n in sorted(os.listdir(root))
          if n.endswith(".py") and not n.startswith("_")]


def _read(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def stdlib_source_text(max_chars: int = 600_000) -> str:
  """Python source from the standard library (top-level modules, sorted by name)."""
  parts, total = [], 0
  for path in _stdlib_modules():
    text = _read(path)
    parts.append(text)
    total += len(text)
    if total >= max_chars:
      break
  return "".join(parts)[:max_chars]


def stdlib_docstrings_text(*, skip_chars: int = 600_000, max_chars: int = 60_000) -> str:
  """English docstrings of the standard library modules that the upstream text does not reach.

  The modules whose source makes up the first ``skip_chars`` characters (the
  upstream pre-training text) are skipped; of the rest, the module, class and
  function docstrings, in file and source order. Prose from another source
  than the pydoc topics: the language benchmark's shifted downstream set.
  """
  import ast

  parts, seen, total = [], 0, 0
  for path in _stdlib_modules():
    text = _read(path)
    seen += len(text)
    if seen <= skip_chars:
      continue
    try:
      tree = ast.parse(text)
    except SyntaxError:
      continue
    nodes = [tree, *(n for n in ast.walk(tree)
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    for node in nodes:
      doc = ast.get_docstring(node)
      if doc and len(doc) > 80:
        parts.append(doc)
        total += len(doc) + 2
    if total >= max_chars:
      break
  return "\n\n".join(parts)[:max_chars]


def pydoc_topics_text(max_chars: int | None = None) -> str:
  """The English prose of ``pydoc_data/topics.py`` (the help() topics), sorted by topic."""
  from pydoc_data import topics

  text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
  return text if max_chars is None else text[:max_chars]


@dataclasses.dataclass(frozen=True)
class TextData:
  up_train: np.ndarray
  up_val: np.ndarray
  down_train: np.ndarray
  down_val: np.ndarray
  down_shift: np.ndarray  # stdlib docstrings: prose from another source (evaluation only)


def text_transfer(*, up_chars: int = 600_000, val_fraction: float = 0.1) -> TextData:
  """Upstream: stdlib source code; downstream: pydoc topics prose; last 10% held out."""

  def split(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(tokens) * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]

  up_train, up_val = split(encode(stdlib_source_text(up_chars)))
  down_train, down_val = split(encode(pydoc_topics_text()))
  shift = encode(stdlib_docstrings_text(skip_chars=up_chars))
  return TextData(up_train, up_val, down_train, down_val, shift)


def fixed_windows(tokens: np.ndarray, n: int, length: int) -> np.ndarray:
  """``n`` evenly spaced windows of ``length + 1`` tokens (deterministic evaluation set)."""
  starts = np.linspace(0, len(tokens) - length - 2, n).astype(np.int64)
  return np.stack([tokens[s:s + length + 1] for s in starts])


def digits_scratch(*, train_per_class: int = 30, val_per_class: int = 30,
                   split_seed: int = 0) -> tuple[Split, Split, Split]:
  """All ten digits, few-shot: ``train_per_class`` / ``val_per_class`` per class, rest test."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  perm = np.random.RandomState(split_seed).permutation(len(y))
  x, y = x[perm], y[perm]
  tr, va, te = [], [], []
  for c in range(10):
    idx = np.flatnonzero(y == c)
    tr.append(idx[:train_per_class])
    va.append(idx[train_per_class:train_per_class + val_per_class])
    te.append(idx[train_per_class + val_per_class:])
  return tuple(Split(x[i], y[i]) for i in (np.sort(np.concatenate(s)) for s in (tr, va, te)))


# Distribution shifts of the downstream test images, at fixed severities (deterministic: the noise
# is drawn from a fixed seed). Images are (N, 8, 8, 1) in [0, 1].
SHIFTS = ("noise", "blur", "rotation", "contrast")
NOISE_STD = 0.2  # Gaussian pixel noise, in units of the [0, 1] intensity range
BLUR_SIGMA = 0.8  # Gaussian blur, pixels
ROTATION_DEG = 20.0  # alternating +/- per image
CONTRAST = 0.4  # intensities pulled toward each image's mean by this factor


def shifted_images(x: np.ndarray, kind: str, *, seed: int = 0) -> np.ndarray:
  """``x`` under one of :data:`SHIFTS` at its fixed severity, clipped to [0, 1]."""
  from scipy import ndimage

  img = x[..., 0].astype(np.float64)
  if kind == "noise":
    out = img + NOISE_STD * np.random.RandomState(seed).standard_normal(img.shape)
  elif kind == "blur":
    out = np.stack([ndimage.gaussian_filter(i, BLUR_SIGMA, mode="constant") for i in img])
  elif kind == "rotation":
    angles = np.where(np.arange(len(img)) % 2 == 0, ROTATION_DEG, -ROTATION_DEG)
    out = np.stack([ndimage.rotate(i, a, reshape=False, order=1, mode="constant")
                    for i, a in zip(img, angles, strict=True)])
  elif kind == "contrast":
    mean = img.mean(axis=(1, 2), keepdims=True)
    out = mean + CONTRAST * (img - mean)
  else:
    raise ValueError(f"shifted_images: kind={kind!r}; expected one of {SHIFTS}.")
  return np.clip(out, 0.0, 1.0).astype(np.float32)[..., None]


def shifted_splits(split: Split) -> dict[str, Split]:
  """The split under every shift: ``{'noise': Split, ...}`` (same labels)."""
  return {k: Split(shifted_images(split.x, k), split.y) for k in SHIFTS}
