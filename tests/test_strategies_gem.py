"""GEM: dual QP solver and projection against NumPy brute force (active sets)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clflax.strategies import gem

T_MAX = 5


def _tree(flat):
  """12-vector (or [T, 12]) -> {'w': [..., 3, 2], 'b': [..., 2], 'h': {'k': [..., 4]}}."""
  flat = np.asarray(flat, np.float32)
  lead = flat.shape[:-1]
  return {'w': flat[..., :6].reshape(lead + (3, 2)), 'b': flat[..., 6:8],
          'h': {'k': flat[..., 8:]}}


def _flat(tree):
  lead = tree['b'].shape[:-1]
  return np.concatenate([np.reshape(tree['w'], lead + (6,)), tree['b'],
                         tree['h']['k']], axis=-1)


def _brute_force_qp(p, c, lower, valid):
  """min 0.5 v'Pv + c'v, v >= lower on valid, v = 0 elsewhere: try all active sets."""
  t = len(c)
  idx = [i for i in range(t) if valid[i]]
  found = []
  for r in range(len(idx) + 1):
    for free in itertools.combinations(idx, r):
      v = np.where(valid, lower, 0.0).astype(np.float64)
      free = list(free)
      if free:
        rest = [i for i in range(t) if i not in free]
        rhs = -(c[free] + p[np.ix_(free, rest)] @ v[rest])
        v[free] = np.linalg.solve(p[np.ix_(free, free)], rhs)
      grad = p @ v + c
      scale = 1e-9 * (np.abs(c).max() + np.abs(p).max())
      bound = [i for i in idx if i not in free]
      if np.all(v[free] >= lower[free] - scale) and np.all(grad[bound] >= -scale):
        found.append(v)
  assert len(found) == 1, f'expected a unique KKT point, found {len(found)}'
  return found[0]


def _numpy_gem(g, task_g, margin, valid):
  g, task_g = g.astype(np.float64), task_g.astype(np.float64)
  dots = task_g @ g
  if not np.any(valid & (dots < 0)):
    return g
  lower = np.where(valid, margin, 0.0)
  v = _brute_force_qp(task_g @ task_g.T, dots, lower, valid)
  return g + task_g.T @ v


_solve = jax.jit(gem.solve_dual)
_project = jax.jit(gem.project)


def test_solve_dual_matches_brute_force_kkt():
  rng = np.random.default_rng(0)
  for trial in range(40):
    a = rng.normal(size=(T_MAX, T_MAX + 2))
    p = a @ a.T + 0.05 * np.eye(T_MAX)
    c = rng.normal(size=T_MAX) * (1 + 3 * (trial % 3))
    valid = rng.random(T_MAX) < 0.8
    want = _brute_force_qp(p, c, np.zeros(T_MAX), valid)
    got = np.asarray(_solve(jnp.asarray(p, jnp.float32),
                            jnp.asarray(c, jnp.float32), jnp.asarray(valid)))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max() + 1e-5)
    assert np.all(got >= 0) and np.all(got[~valid] == 0)


def test_project_matches_brute_force_on_random_problems():
  rng = np.random.default_rng(1)
  active_counts = []
  for trial in range(40):
    g = rng.normal(size=12)
    task_g = rng.normal(size=(T_MAX, 12))
    task_g[: trial % 3] -= 1.5 * g  # Make some constraints violated.
    valid = rng.random(T_MAX) < 0.8
    margin = [0.0, 0.0, 0.3][trial % 3]
    want = _numpy_gem(g, task_g, margin, valid)
    got = _flat(_project(_tree(g), _tree(task_g), margin, jnp.asarray(valid)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if margin == 0:
      # Primal feasibility: no valid previous task's loss goes up.
      assert np.all(task_g[valid] @ got >= -1e-4 * np.abs(task_g).max())
    active_counts.append(int(np.sum(task_g[valid] @ want < 1e-6)))
  assert max(active_counts) >= 2  # Several constraints active at once.


def _padded(rows):
  """[n, 12] task gradients padded to T_MAX garbage rows, and their valid mask."""
  rows = np.asarray(rows)
  pad = np.full((T_MAX - len(rows), 12), 1e3)
  return (_tree(np.concatenate([rows, pad])),
          jnp.asarray(np.arange(T_MAX) < len(rows)))


def test_single_task_equals_agem_closed_form():
  rng = np.random.default_rng(2)
  g = rng.normal(size=12)
  r = -g + 0.5 * rng.normal(size=12)
  assert g @ r < 0
  want = g - (g @ r) / (r @ r) * r
  task_g, valid = _padded([r])
  got = _flat(_project(_tree(g), task_g, 0.0, valid))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Two copies of the same constraint (a singular Gram matrix): same answer.
  task_g, valid = _padded([r, r])
  got = _flat(_project(_tree(g), task_g, 0.0, valid))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_no_violation_leaves_grads_unchanged_even_with_margin():
  rng = np.random.default_rng(3)
  g = rng.normal(size=12).astype(np.float32)
  task_g = rng.normal(size=(T_MAX, 12))
  task_g = np.where((task_g @ g < 0)[:, None], -task_g, task_g)
  # An invalid row that conflicts (and holds garbage) is ignored.
  task_g[-1] = -1e6 * g
  valid = np.array([True] * (T_MAX - 1) + [False])
  got = _flat(_project(_tree(g), _tree(task_g), 0.5, jnp.asarray(valid)))
  np.testing.assert_array_equal(got, g)


def test_tiny_gradients_still_project():
  rng = np.random.default_rng(4)
  g = rng.normal(size=12)
  task_g = rng.normal(size=(T_MAX, 12)) - g
  want = _numpy_gem(g, task_g, 0.0, np.ones(T_MAX, bool))
  got = _flat(_project(_tree(g), _tree(task_g * np.float32(1e-25)), 0.0,
                       jnp.ones(T_MAX, bool)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_one_compilation_for_all_task_counts():
  rng = np.random.default_rng(5)
  g, task_g = _tree(rng.normal(size=12)), _tree(rng.normal(size=(T_MAX, 12)))
  _project(g, task_g, 0.0, jnp.ones(T_MAX, bool))
  compiled = _project._cache_size()
  for n in range(T_MAX):
    _project(g, task_g, 0.0, jnp.asarray(np.arange(T_MAX) < n))
  assert _project._cache_size() == compiled


def test_transform_in_chain_with_extra_args():
  rng = np.random.default_rng(6)
  params = _tree(rng.normal(size=12))
  g = rng.normal(size=12)
  rows = rng.normal(size=(2, 12)) - g
  task_g, valid = _padded(rows)
  lr = 0.1
  tx = optax.chain(gem.gem(margin=0.0), optax.sgd(lr))
  state = tx.init(params)
  update = jax.jit(tx.update)
  got, _ = update(_tree(g), state, params, task_grads=task_g,
                  task_valid=valid, ref_grads=None, step=3)
  want = -lr * _numpy_gem(g, rows, 0.0, np.ones(2, bool))
  np.testing.assert_allclose(_flat(got), want, rtol=1e-4, atol=1e-5)
  got, _ = tx.update(_tree(g), state, params)  # No task_grads: identity.
  np.testing.assert_allclose(_flat(got), -lr * g, rtol=1e-6)


def test_bad_inputs_raise():
  g = {'a': jnp.ones(2)}
  with pytest.raises(ValueError, match='tree structure'):
    gem.project(g, {'b': jnp.ones((1, 2))})
  with pytest.raises(ValueError, match=r'\[T, \*grad.shape\]'):
    gem.project(g, {'a': jnp.ones((2, 3))})
  with pytest.raises(ValueError, match='margin'):
    gem.gem(-1.0)
  with pytest.raises(ValueError, match='valid must have shape'):
    gem.project(g, {'a': jnp.ones((2, 2))}, 0.0, jnp.ones(3, bool))
  with pytest.raises(ValueError, match='gram must be'):
    gem.solve_dual(jnp.eye(3), jnp.ones(2))
