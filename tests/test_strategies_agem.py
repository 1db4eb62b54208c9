"""A-GEM projection and transform, against NumPy on the flattened vector."""
import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clflax.strategies import agem
from clflax.strategies import ewc

SHAPES = {'w': (3, 2), 'b': (2,), 'head': {'k': (4,)}}


def _tree(flat):
  """Unflattens a 12-vector into the SHAPES pytree (NumPy leaves)."""
  flat = np.asarray(flat, np.float32)
  return {'w': flat[:6].reshape(3, 2), 'b': flat[6:8], 'head': {'k': flat[8:]}}


def _flat(tree):
  return np.concatenate([np.ravel(tree['w']), np.ravel(tree['b']),
                         np.ravel(tree['head']['k'])])


def _numpy_project(g, r):
  dot = g @ r
  if dot < 0 and r @ r > 0:
    return g - dot / (r @ r) * r
  return g


_project = jax.jit(agem.project)


def test_project_matches_numpy_flat_vector():
  rng = np.random.default_rng(0)
  g = rng.normal(size=12).astype(np.float32)
  r = rng.normal(size=12).astype(np.float32)
  if g @ r > 0:
    r = -r  # Make sure the projection is active.
  got = _flat(_project(_tree(g), _tree(r)))
  np.testing.assert_allclose(got, _numpy_project(g, r), rtol=1e-5, atol=1e-6)
  assert abs(got @ r) < 1e-4  # Lands on the boundary <g~, r> = 0.


def test_flat_differs_from_leafwise_projection():
  # Leaf 'w' conflicts (<g_w, r_w> = -1) but the whole vector does not (+1):
  # a leaf-by-leaf projection would change 'w'; A-GEM must not.
  g = np.zeros(12, np.float32)
  r = np.zeros(12, np.float32)
  g[0], r[0] = 1.0, -1.0   # in 'w'
  g[6], r[6] = 1.0, 2.0    # in 'b'
  leafwise_w = np.array([1., 0, 0, 0, 0, 0]) - (-1.0 / 1.0) * np.array(
      [-1., 0, 0, 0, 0, 0])
  assert not np.allclose(leafwise_w, g[:6])
  got = _flat(_project(_tree(g), _tree(r)))
  np.testing.assert_array_equal(got, g)

  # And a flat conflict where leaf 'b' alone agrees: 'b' still gets projected.
  r[6] = 0.5  # flat dot = -1 + 0.5 < 0, leaf 'b' dot = +0.5.
  got = _flat(_project(_tree(g), _tree(r)))
  np.testing.assert_allclose(got, _numpy_project(g, r), rtol=1e-6)
  assert got[6] != g[6]


def test_zero_reference_leaves_grads_unchanged():
  g = np.arange(12, dtype=np.float32) - 6
  got = _flat(_project(_tree(g), _tree(np.zeros(12))))
  np.testing.assert_array_equal(got, g)


def test_tiny_reference_gradient_still_projects():
  # <r, r> of this r underflows float32; the projection is scale invariant.
  rng = np.random.default_rng(2)
  g = rng.normal(size=12).astype(np.float32)
  r = -g + rng.normal(size=12).astype(np.float32)
  want = _numpy_project(g.astype(np.float64), r.astype(np.float64))
  got = _flat(_project(_tree(g), _tree(r * np.float32(1e-25))))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_structure_mismatch_raises():
  with pytest.raises(ValueError, match='tree structure'):
    agem.project({'a': jnp.ones(2)}, {'b': jnp.ones(2)})


# Subnormal float32 values are flushed to zero by XLA:CPU (r then counts as 0).
_vec = hnp.arrays(np.float32, 12, elements=st.floats(
    -10, 10, width=32, allow_subnormal=False))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(_vec, _vec)
def test_projection_properties(g, r):
  got = _flat(_project(_tree(g), _tree(r)))
  g64, r64, got64 = (np.asarray(x, np.float64) for x in (g, r, got))
  scale = np.linalg.norm(g64) * np.linalg.norm(r64) + 1e-6
  # Never points against the memory gradient.
  assert got64 @ r64 >= -1e-5 * scale
  if g64 @ r64 >= 1e-5 * scale:
    np.testing.assert_array_equal(got, g)
  else:
    np.testing.assert_allclose(got64, _numpy_project(g64, r64),
                               rtol=1e-4, atol=1e-4 * (np.abs(g64).max() + 1))


def test_transform_in_chain_with_extra_args():
  rng = np.random.default_rng(1)
  params = _tree(rng.normal(size=12))
  anchor = _tree(rng.normal(size=12))
  fisher = _tree(rng.uniform(size=12))
  g = rng.normal(size=12).astype(np.float32)
  r = -g + 0.1 * rng.normal(size=12).astype(np.float32)  # Conflicting.
  lr, strength = 0.1, 3.0
  tx = optax.chain(ewc.ewc(strength), agem.agem(), optax.sgd(lr))
  state = tx.init(params)
  state = (ewc.EwcState(fisher, anchor),) + state[1:]
  update = jax.jit(tx.update)
  # Other transforms get (and ignore) ref_grads; unknown extras are ignored.
  got, _ = update(_tree(g), state, params, ref_grads=_tree(r), step=3)
  total = g + strength * _flat(fisher) * (_flat(params) - _flat(anchor))
  want = -lr * _numpy_project(total.astype(np.float64), r.astype(np.float64))
  np.testing.assert_allclose(_flat(got), want, rtol=1e-5, atol=1e-6)
  # Without ref_grads, A-GEM is the identity.
  got, _ = tx.update(_tree(g), state, params)
  np.testing.assert_allclose(_flat(got), -lr * total, rtol=1e-5, atol=1e-6)
