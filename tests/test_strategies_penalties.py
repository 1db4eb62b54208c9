"""EWC, MAS, L2 and SI against closed forms and NumPy loops."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clflax.strategies import _quadratic
from clflax.strategies import ewc
from clflax.strategies import l2
from clflax.strategies import mas
from clflax.strategies import si

D, C, N = 3, 4, 10  # Input dim, classes, examples (N % chunk != 0 below).


def _softmax_regression():
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(D, C)).astype(np.float32),
            'b': rng.normal(size=(C,)).astype(np.float32)}
  batch = {'x': rng.normal(size=(N, D)).astype(np.float32),
           'y': rng.integers(0, C, size=N).astype(np.int32)}
  return params, batch


def _ce_loss(params, example):
  logits = example['x'] @ params['w'] + params['b']
  return -jax.nn.log_softmax(logits)[example['y']]


def _numpy_fisher(params, batch):
  """Closed-form per-example CE gradients x (p - onehot), squared, in a loop."""
  fw, fb = np.zeros((D, C)), np.zeros(C)
  for x, y in zip(batch['x'].astype(np.float64), batch['y']):
    z = x @ params['w'] + params['b']
    p = np.exp(z - z.max())
    p /= p.sum()
    delta = p - np.eye(C)[y]
    fw += np.outer(x, delta) ** 2
    fb += delta ** 2
  return {'w': fw / N, 'b': fb / N}


@pytest.mark.parametrize('chunk_size', [None, 3, 4, 10, 64])
def test_fisher_diagonal_matches_loop(chunk_size):
  params, batch = _softmax_regression()
  got = jax.jit(lambda p, b: ewc.fisher_diagonal(
      _ce_loss, p, b, chunk_size=chunk_size))(params, batch)
  want = _numpy_fisher(params, batch)
  for k in ('w', 'b'):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('size', range(1, 10))
def test_sum_leading_is_the_sum_over_the_leading_axis(size):
  x = np.random.default_rng(size).normal(size=(size, 3, 5)).astype(np.float32)
  np.testing.assert_allclose(_quadratic.sum_leading(jnp.asarray(x)), x.astype(np.float64).sum(0), rtol=1e-5,
                             atol=1e-6)


def test_fisher_bad_input():
  params, batch = _softmax_regression()
  with pytest.raises(ValueError, match='chunk_size'):
    ewc.fisher_diagonal(_ce_loss, params, batch, chunk_size=0)
  with pytest.raises(ValueError, match='leading axis'):
    ewc.fisher_diagonal(_ce_loss, params, {'x': batch['x'], 'y': batch['y'][:3]})


def _linear_out(params, example):
  return example['x'] @ params['w'] + params['b']


@pytest.mark.parametrize('chunk_size', [None, 4])
def test_mas_importance_matches_loop(chunk_size):
  params, batch = _softmax_regression()
  got = mas.importance(_linear_out, params, batch, chunk_size=chunk_size)
  # d ||W^T x + b||^2 / dW = 2 x out^T, / db = 2 out; abs, mean over examples.
  iw, ib = np.zeros((D, C)), np.zeros(C)
  for x in batch['x'].astype(np.float64):
    out = x @ params['w'] + params['b']
    iw += np.abs(2 * np.outer(x, out))
    ib += np.abs(2 * out)
  np.testing.assert_allclose(got['w'], iw / N, rtol=1e-5)
  np.testing.assert_allclose(got['b'], ib / N, rtol=1e-5)


def _random_trees(seed, n=3):
  rng = np.random.default_rng(seed)
  return [{'w': rng.normal(size=(D, C)).astype(np.float32),
           'b': rng.normal(size=(C,)).astype(np.float32)} for _ in range(n)]


def test_ewc_penalty_matches_numpy():
  params, anchor, fisher = _random_trees(1)
  fisher = jax.tree.map(np.abs, fisher)
  want = 0.5 * sum(np.sum(fisher[k] * (params[k] - anchor[k]) ** 2)
                   for k in ('w', 'b'))
  np.testing.assert_allclose(ewc.penalty(params, anchor, fisher), want,
                             rtol=1e-5)


def _ref_penalty(params, anchor, weight):
  """Independent reference: plain jnp on the two named leaves."""
  return 0.5 * (jnp.sum(weight['w'] * (params['w'] - anchor['w']) ** 2)
                + jnp.sum(weight['b'] * (params['b'] - anchor['b']) ** 2))


@pytest.mark.parametrize('strategy', ['ewc', 'mas', 'l2'])
def test_penalty_transform_is_grad_of_penalty(strategy):
  params, anchor, weight = _random_trees(2)
  weight = jax.tree.map(np.abs, weight)
  grads = _random_trees(3, 1)[0]
  strength = 2.5
  if strategy == 'ewc':
    tx = ewc.ewc(strength)
    consolidated = ewc.consolidate(tx.init(anchor), anchor, weight)
  elif strategy == 'mas':
    tx = mas.mas(strength)
    consolidated = mas.consolidate(tx.init(anchor), anchor, weight)
  else:
    tx = l2.l2(strength)
    consolidated = l2.consolidate(tx.init(params), anchor)
    weight = jax.tree.map(np.ones_like, weight)
  update = jax.jit(tx.update)
  # Before consolidation: identity (the parameters have moved from init).
  moved = jax.tree.map(lambda p: p + 1.0, params)
  got, _ = update(grads, tx.init(params), moved)
  for k in ('w', 'b'):
    np.testing.assert_array_equal(got[k], grads[k])
  # After: task gradient + grad of strength * penalty.
  got, state = update(grads, consolidated, params)
  pen_grad = jax.grad(lambda p: strength * _ref_penalty(p, anchor, weight))(
      params)
  for k in ('w', 'b'):
    np.testing.assert_allclose(got[k], grads[k] + pen_grad[k], rtol=1e-5,
                               atol=1e-6)
  assert type(state) is type(consolidated)
  with pytest.raises(ValueError, match='params'):
    tx.update(grads, consolidated)


def test_consolidate_online_decay():
  old, new, p1, p2 = _random_trees(4, 4)
  state = ewc.EwcState(old, p1)
  got = ewc.consolidate(state, p2, new, decay=0.5)
  np.testing.assert_allclose(got.fisher['w'], 0.5 * old['w'] + new['w'],
                             rtol=1e-6)
  np.testing.assert_array_equal(got.anchor['b'], p2['b'])
  got = ewc.consolidate(state, p2, new, decay=0.0)
  np.testing.assert_array_equal(got.fisher['w'], new['w'])
  got = mas.consolidate(mas.MasState(old, p1), p2, new)
  np.testing.assert_allclose(got.importance['b'], old['b'] + new['b'],
                             rtol=1e-6)


def test_running_and_normalized_fisher():
  grads = _random_trees(5, 4)
  acc = jax.tree.map(np.zeros_like, grads[0])
  want = {k: np.zeros_like(v, dtype=np.float64) for k, v in acc.items()}
  for g in grads:
    acc = ewc.running_fisher(acc, g, decay=0.9)
    want = {k: 0.9 * want[k] + 0.1 * g[k].astype(np.float64) ** 2
            for k in want}
  for k in want:
    np.testing.assert_allclose(acc[k], want[k], rtol=1e-5)
  norm = ewc.normalize_fisher(acc)
  top = max(want['w'].max(), want['b'].max())  # Global, not per leaf.
  for k in want:
    np.testing.assert_allclose(norm[k], want[k] / top, rtol=1e-5)
  zeros = ewc.normalize_fisher({'a': jnp.zeros(3)})
  np.testing.assert_array_equal(zeros['a'], np.zeros(3))


def test_negative_strength_rejected():
  for make in (ewc.ewc, mas.mas, l2.l2, si.si):
    with pytest.raises(ValueError, match='strength'):
      make(-1.0)
  with pytest.raises(ValueError, match='damping'):
    si.si(1.0, damping=0.0)
  with pytest.raises(ValueError, match='max_stiffness'):
    si.si(1.0, max_stiffness=-1.0)


# --- Synaptic Intelligence -------------------------------------------------

def test_si_omega_with_sgd_matches_closed_form():
  """Quadratic loss 0.5 a (theta - c)^2, SGD: omega = sum_t lr * g_t^2."""
  a = np.array([1.0, 0.5, 2.0, 0.1], np.float32)
  c = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
  theta0 = np.zeros(4, np.float32)
  lr, steps, damping, strength = 0.1, 7, 0.1, 0.3
  tx = optax.chain(si.si(strength, damping), optax.sgd(lr))

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: 0.5 * jnp.sum(a * (p['t'] - c) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, state = {'t': jnp.asarray(theta0)}, tx.init({'t': theta0})
  for _ in range(steps):
    params, state = step(params, state)
  si_state = si.consolidate(state[0], params)

  theta, omega = theta0.astype(np.float64), np.zeros(4)
  for _ in range(steps):
    g = a * (theta - c)
    omega += lr * g ** 2
    theta = theta - lr * g
  np.testing.assert_allclose(params['t'], theta, rtol=1e-5)
  want_importance = omega / ((theta - theta0) ** 2 + damping)
  np.testing.assert_allclose(si_state.importance['t'], want_importance,
                             rtol=1e-4)
  np.testing.assert_array_equal(si_state.omega['t'], np.zeros(4))
  np.testing.assert_array_equal(si_state.anchor['t'], params['t'])

  # Second task: gradient = raw grad + strength * importance * (p - anchor).
  g = jnp.array([0.3, -0.2, 0.1, 0.0])
  moved = {'t': params['t'] + 0.5}
  new_state = (si_state,) + state[1:]
  updates, _ = tx.update({'t': g}, new_state, moved)
  want = -lr * (np.asarray(g) + strength * want_importance * 0.5)
  np.testing.assert_allclose(updates['t'], want, rtol=1e-4, atol=1e-6)


def test_si_path_integral_with_momentum_matches_numpy():
  """General case: omega = -sum_t g_t * (theta_{t+1} - theta_t), raw g_t."""
  a = np.array([2.0, 0.3], np.float32)
  lr, mom, steps, strength = 0.05, 0.9, 6, 1.0
  tx = optax.chain(si.si(strength), optax.sgd(lr, momentum=mom))
  # Task 1 consolidated at theta=0 with importance 1, so the penalty is on.
  state = tx.init({'t': jnp.zeros(2)})
  ones = {'t': jnp.ones(2)}
  state = (state[0]._replace(importance=ones),) + state[1:]
  params = {'t': jnp.array([1.0, -1.0])}
  state = (state[0]._replace(prev_params=params),) + state[1:]

  theta, vel, omega = np.array([1.0, -1.0]), np.zeros(2), np.zeros(2)
  for _ in range(steps):
    g_raw = a * theta  # Loss 0.5 a theta^2; SI books the RAW gradient only.
    grads = {'t': jnp.asarray(g_raw, jnp.float32)}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    vel = mom * vel + g_raw + strength * 1.0 * theta
    new_theta = theta - lr * vel
    omega += -g_raw * (new_theta - theta)
    theta = new_theta
  np.testing.assert_allclose(params['t'], theta, rtol=1e-5)
  final = si.consolidate(state[0], params)
  want = 1.0 + omega / ((theta - 0.0) ** 2 + 0.1)
  np.testing.assert_allclose(final.importance['t'], want, rtol=1e-4)


def test_si_stiffness_cap_keeps_sgd_stable_on_its_own_penalty():
  """Only the penalty, SGD: deviation d -> (1 - lr * k) d per step, k = strength * Omega (capped)."""
  lr, strength = 0.1, 0.2
  importance = np.array([1.0, 50.0, 300.0], np.float32)  # lr * k: 0.02, 1.0, 6.0 (> 2: unstable).
  start = np.array([1.0, 1.0, 1.0], np.float32)

  def run(max_stiffness, steps=10):
    tx = optax.chain(si.si(strength, max_stiffness=max_stiffness), optax.sgd(lr))
    params = {'t': jnp.asarray(start)}
    state = tx.init({'t': jnp.zeros(3)})  # Anchor 0.
    state = (state[0]._replace(importance={'t': jnp.asarray(importance)}),) + state[1:]
    for _ in range(steps):
      updates, state = tx.update({'t': jnp.zeros(3)}, state, params)
      params = optax.apply_updates(params, updates)
    return np.asarray(params['t'])

  uncapped = run(0.0)
  np.testing.assert_allclose(uncapped, start * (1 - lr * strength * importance) ** 10, rtol=1e-4)
  assert abs(uncapped[2]) > 1e6  # (1 - 6)^10: the explicit step blows up.
  capped = run(1 / lr)  # k = min(strength * Omega, 10): lr * k = 0.02, 1.0, 1.0.
  np.testing.assert_allclose(capped, [(1 - 0.02) ** 10, 0.0, 0.0], atol=1e-6)
