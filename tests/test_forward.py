"""forward_order: parameter ranks by first read in the traced forward pass.

Every expected order below is written by hand from the model's definition
(which op touches which parameter first), never produced by the code under
test.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from dualopt_jax._forward import forward_order

X = jnp.ones((1, 3))


def _linen_fn(model):
  return lambda p, x: model.apply({"params": p}, x)


def _linen_params(model, x=X):
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


# ----------------------------------------------------------------------------- Linen


class _ZAM(nn.Module):
  """Dense layers named z, a, m and used in that order (sorted names would say a, m, z)."""

  @nn.compact
  def __call__(self, x):
    x = jax.nn.relu(nn.Dense(4, name="z")(x))
    x = jax.nn.relu(nn.Dense(4, name="a")(x))
    return nn.Dense(2, name="m")(x)


def test_linen_mlp_order_of_use_not_names():
  model = _ZAM()
  order = forward_order(_linen_fn(model), _linen_params(model), X)
  assert order == {
    "z/kernel": 0,
    "z/bias": 1,
    "a/kernel": 2,
    "a/bias": 3,
    "m/kernel": 4,
    "m/bias": 5,
  }
  assert list(order) == ["z/kernel", "z/bias", "a/kernel", "a/bias", "m/kernel", "m/bias"]
  assert all(type(v) is int for v in order.values())


class _Block(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    return jax.nn.relu(nn.Dense(3, name="dense")(c)), None


class _Scanned(nn.Module):
  reverse: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(3, name="inp")(x)
    stack = nn.scan(
      _Block,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=3,
      reverse=self.reverse,
    )
    x, _ = stack(name="blocks")(x, None)
    return nn.Dense(2, name="out")(x)


def test_linen_scan_slices_interleave():
  model = _Scanned()
  order = forward_order(_linen_fn(model), _linen_params(model), X)
  # inp (0, 1); iteration j reads kernel[j] then bias[j]; out last.
  assert order == {
    "inp/kernel": 0,
    "inp/bias": 1,
    "blocks/dense/kernel": (2, 4, 6),
    "blocks/dense/bias": (3, 5, 7),
    "out/kernel": 8,
    "out/bias": 9,
  }


def test_linen_scan_reverse():
  model = _Scanned(reverse=True)
  order = forward_order(_linen_fn(model), _linen_params(model), X)
  # reverse=True: iteration 0 reads slice 2, iteration 2 reads slice 0.
  assert order["blocks/dense/kernel"] == (6, 4, 2)
  assert order["blocks/dense/bias"] == (7, 5, 3)
  assert order["inp/kernel"] == 0 and order["out/bias"] == 9


class _RematJit(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.jit(nn.Dense)(3, name="w_jit")(x)
    x = nn.remat(nn.Dense)(3, name="b_remat")(x)
    return nn.Dense(2, name="a_plain")(x)


def test_linen_remat_and_jit():
  model = _RematJit()
  order = forward_order(_linen_fn(model), _linen_params(model), X)
  assert order == {
    "w_jit/kernel": 0,
    "w_jit/bias": 1,
    "b_remat/kernel": 2,
    "b_remat/bias": 3,
    "a_plain/kernel": 4,
    "a_plain/bias": 5,
  }


# ----------------------------------------------------------------------------- control flow


def _tree(**shapes):
  return {k: jnp.ones(s) for k, s in shapes.items()}


def test_cond_takes_earliest_read_over_branches():
  params = _tree(pre=(3, 3), c=(3, 3), d=(3, 3), post=(3, 3))

  def fn(p, x):
    x = x @ p["pre"]

    def slow(x):  # reads d, then c
      x = jnp.sin(x)
      x = x @ p["d"]
      return x @ p["c"]

    def fast(x):  # reads c first thing
      return x @ p["c"]

    x = jax.lax.cond(x.sum() > 0, slow, fast, x)
    return x @ p["post"]

  # c: eqn 0 of `fast`; d: eqn 1 of `slow`.
  assert forward_order(fn, params, X) == {"pre": 0, "c": 1, "d": 2, "post": 3}


def test_switch_and_while():
  params = _tree(thr=(3,), body=(3, 3), alt=(3, 3), last=(3, 3))

  def fn(p, x):
    def cond(carry):
      return (carry[1] * p["thr"]).sum() < 10.0

    def body(carry):
      return carry[0] + 1, carry[1] @ p["body"]

    _, x = jax.lax.while_loop(cond, body, (0, x))
    x = jax.lax.switch(1, [lambda y: y @ p["alt"], lambda y: y], x)
    return x @ p["last"]

  # the loop's condition runs before its body; switch: alt read in branch 0.
  assert forward_order(fn, params, X) == {"thr": 0, "body": 1, "alt": 2, "last": 3}


def test_custom_vjp_and_custom_jvp_inside_the_model():
  @jax.custom_vjp
  def clipped_matmul(x, w):
    return x @ w

  clipped_matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

  @jax.custom_jvp
  def gated(x, gain):
    return jnp.tanh(x) * gain

  gated.defjvp(lambda primals, tangents: (gated(*primals), tangents[0] * primals[1]))

  params = _tree(w1=(3, 3), gain=(3,), w0=(3, 3))

  def fn(p, x):
    x = clipped_matmul(x, p["w1"])
    x = gated(x, p["gain"])
    return clipped_matmul(x, p["w0"])

  assert forward_order(fn, params, X) == {"w1": 0, "gain": 1, "w0": 2}


def test_shard_map_inside_the_model():
  mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
  params = _tree(inner=(3, 3), outer=(3, 3))

  def fn(p, x):
    @jax.jit
    def local(p, x):
      inner = jax.shard_map(
        lambda w, y: y @ w, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data")
      )
      return inner(p["inner"], x)

    return local(p, x) @ p["outer"]

  x = jax.ShapeDtypeStruct((2, 3), jnp.float32)
  assert forward_order(fn, params, x) == {"inner": 0, "outer": 1}


# ----------------------------------------------------------------------------- NNX


class _ListNet(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(3)])
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    for i in (2, 0, 1):
      x = jax.nn.relu(self.layers[i](x))
    return self.head(x)


def test_nnx_list_layers():
  order = forward_order(_ListNet(nnx.Rngs(0)), X)
  assert order == {
    "layers/2/kernel": 0,
    "layers/2/bias": 1,
    "layers/0/kernel": 2,
    "layers/0/bias": 3,
    "layers/1/kernel": 4,
    "layers/1/bias": 5,
    "head/kernel": 6,
    "head/bias": 7,
  }


class _Layer(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (3, 3)))
    self.b = nnx.Param(jnp.zeros((3,)))
    self.calls = nnx.BatchStat(jnp.zeros(()))  # non-Param state stays as it is

  def __call__(self, x):
    return jnp.tanh(x @ self.w + self.b)


def _make_stack(rngs, n):
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return _Layer(rngs)

  return make(rngs)


class _ScanNet(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Linear(3, 3, rngs=rngs)
    self.stack = _make_stack(rngs, 3)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x, *, train):
    x = self.embed(x)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, layer):
      return layer(x)

    x = body(x, self.stack)
    return self.drop(x, deterministic=not train)


def test_nnx_vmap_stack_consumed_by_nnx_scan():
  model = _ScanNet(nnx.Rngs(0))
  count_before = int(model.drop.rngs.count.get_value())
  order = forward_order(model, X, train=True)
  # per layer x @ w + b: w[j] then b[j].
  assert order == {
    "embed/kernel": 0,
    "embed/bias": 1,
    "stack/w": (2, 4, 6),
    "stack/b": (3, 5, 7),
  }
  assert int(model.drop.rngs.count.get_value()) == count_before  # the module is not mutated


class _LoopNet(nnx.Module):
  def __init__(self, rngs):
    self.stack = _make_stack(rngs, 2)
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    graphdef, state = nnx.split(self.stack)
    for i in (1, 0):  # a Python loop over stack[i], last layer first
      x = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))(x)
    return self.head(x)


def test_nnx_python_loop_over_stack_slices():
  order = forward_order(_LoopNet(nnx.Rngs(0)), X)
  assert order == {"stack/w": (2, 0), "stack/b": (3, 1), "head/kernel": 4, "head/bias": 5}
  assert list(order) == ["stack/w", "stack/b", "head/kernel", "head/bias"]


# ----------------------------------------------------------------------------- trees and casts


def test_shape_dtype_struct_params_and_inputs():
  sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  params = {"enc": {"w": sds(3, 4), "b": sds(4)}, "dec": {"w": sds(4, 2)}}

  def fn(p, x):
    return jnp.tanh(x @ p["enc"]["w"] + p["enc"]["b"]) @ p["dec"]["w"]

  assert forward_order(fn, params, sds(5, 3)) == {"enc/w": 0, "enc/b": 1, "dec/w": 2}


def test_bf16_cast_at_the_top_does_not_define_the_order():
  params = _tree(a=(3, 3), b=(3, 3), c=(3, 3), d=(3,))

  def fn(p, x):
    p = jax.tree.map(lambda v: v.astype(jnp.bfloat16), p)  # casts in sorted order a, b, c, d
    x = x.astype(jnp.bfloat16)
    x = x @ p["c"]
    x = x @ p["a"].T.reshape(3, 3)  # pass-through ops before the read
    x = x + jnp.broadcast_to(jax.lax.optimization_barrier(p["d"]), x.shape)
    return x @ p["b"]

  assert forward_order(fn, params, X) == {"c": 0, "a": 1, "d": 2, "b": 3}

  cast = jax.jit(lambda t: jax.tree.map(lambda v: v.astype(jnp.bfloat16), t))

  def fn_jitted_cast(p, x):  # the cast in a jitted helper: its outputs keep their identity
    p = cast(p)
    return (x.astype(jnp.bfloat16) @ p["b"]) @ p["a"] + p["d"] @ p["c"]

  assert forward_order(fn_jitted_cast, params, X) == {"b": 0, "a": 1, "d": 2, "c": 3}


def test_multi_tower_ranks_interleave():
  params = {
    "tower_a": {"embed": jnp.ones((3, 3)), "dense": jnp.ones((3, 3))},
    "tower_b": {"embed": jnp.ones((3, 3)), "layers": {"w": jnp.ones((2, 3, 3)),
                                                     "b": jnp.ones((2, 3))}},
  }

  def fn(p, xa, xb):
    hb = xb @ p["tower_b"]["embed"]
    ha = jax.nn.relu(xa @ p["tower_a"]["embed"]) @ p["tower_a"]["dense"]

    def layer(h, wb):
      return jnp.tanh(h @ wb["w"] + wb["b"]), None

    hb, _ = jax.lax.scan(layer, hb, p["tower_b"]["layers"])
    return ha + hb

  assert forward_order(fn, params, X, X) == {
    "tower_b/embed": 0,
    "tower_a/embed": 1,
    "tower_a/dense": 2,
    "tower_b/layers/w": (3, 5),
    "tower_b/layers/b": (4, 6),
  }


def test_static_index_forms_stack_a_leaf():
  params = {"s": jnp.ones((5, 3)), "t": jnp.ones((3,))}

  def fn(p, x):
    s = p["s"]
    x = x * s[3]  # slice + squeeze
    x = x * jnp.take(s, 1, axis=0)  # gather in a jit
    x = x * p["t"]
    x = x * jax.lax.dynamic_index_in_dim(s, 4, keepdims=False)  # dynamic_slice, literal index
    x = x * s[np.int32(0)]  # dynamic_slice, folded index arithmetic
    return x * jnp.unstack(s)[2]  # unstack

  assert forward_order(fn, params, X) == {"s": (4, 1, 5, 0, 3), "t": 2}


def test_whole_read_before_slicing_gives_every_slice_that_position():
  params = {"first": jnp.ones((3,)), "s": jnp.ones((3, 3)), "last": jnp.ones((3,))}

  def fn(p, x):
    x = x * p["first"]
    norm = jnp.sum(p["s"] ** 2)  # s read whole here
    x = x * p["s"][2] * p["last"]
    return x * norm

  assert forward_order(fn, params, X) == {"first": 0, "s": (1, 2, 3), "last": 4}


def test_integer_and_bool_leaves_are_ignored():
  params = {"w": jnp.ones((3, 3)), "step": jnp.zeros((), jnp.int32), "mask": jnp.ones(3, bool)}

  def fn(p, x):
    return jnp.where(p["mask"], x @ p["w"], 0.0) * p["step"]

  assert forward_order(fn, params, X) == {"w": 0}


def test_returns_empty_dict_without_float_params():
  assert forward_order(lambda p, x: x * p["n"], {"n": jnp.int32(2)}, X) == {}


# ----------------------------------------------------------------------------- errors


def test_unread_parameter_raises():
  params = _tree(body=(3, 3), head=(3, 2))

  def fn(p, x, with_head=False):
    x = x @ p["body"]
    return x @ p["head"] if with_head else x

  with pytest.raises(ValueError, match=r"never read.*head.*exercise every parameter"):
    forward_order(fn, params, X)
  assert forward_order(fn, params, X, with_head=True) == {"body": 0, "head": 1}


def test_a_table_indexed_at_some_rows_is_one_read_not_a_stack():
  """``table[0]`` (a fixed row of an embedding) reads the table; it does not stack layers."""
  params = {"a": jnp.ones((3,)), "s": jnp.ones((3, 3))}
  assert forward_order(lambda p, x: p["a"] * x * p["s"][0], params, X) == {"a": 0, "s": 1}
  assert forward_order(lambda p, x: x * p["s"][2] * p["a"], params, X) == {"s": 0, "a": 1}


def test_unread_error_names_at_most_ten():
  params = {f"p{i:02d}": jnp.ones(()) for i in range(13)}
  with pytest.raises(ValueError, match=r"13 parameter\(s\).*p09 and 3 more"):
    forward_order(lambda p, x: x, params, X)


def test_not_callable_raises():
  with pytest.raises(TypeError, match="callable"):
    forward_order({"w": 1.0}, {"w": jnp.ones(())})


def test_non_array_leaf_raises_with_path():
  with pytest.raises(TypeError, match="'enc/scale'.*not an array"):
    forward_order(lambda p, x: x, {"enc": {"scale": "big"}, "w": jnp.ones(())}, X)


def test_tracing_failure_is_chained():
  def broken(p, x):
    return x @ p["w"]  # (1, 3) @ (4, 4)

  with pytest.raises(ValueError, match=r"tracing .*broken\(params.*dot_general") as info:
    forward_order(broken, {"w": jnp.ones((4, 4))}, X)
  assert info.value.__cause__ is not None
