"""Progressive networks: shapes, frozen earlier columns, laterals that feed."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clflax.models import progressive

MLP = progressive.ProgressiveMLP(hidden=(8, 6), num_classes=3, num_columns=3)
CONV = progressive.ProgressiveConvNet(features=(4, 6), num_classes=3,
                                      num_columns=2)


def _numpy_column0(params, x):
  """Column 0 of the MLP alone is a plain ReLU MLP (no adapters)."""
  h = x.reshape(len(x), -1).astype(np.float64)
  for i in range(2):
    p = params[f'hidden_{i}']
    h = np.maximum(h @ np.asarray(p['kernel']) + np.asarray(p['bias']), 0)
  return h @ np.asarray(params['out']['kernel']) + np.asarray(params['out']['bias'])


def _setup(model, x, num_columns):
  init = jax.jit(model.init, static_argnames='column')
  params = init(jax.random.key(0), x, column=num_columns - 1)['params']
  apply = jax.jit(lambda p, x, column: model.apply({'params': p}, x, column=column),
                  static_argnums=2)
  return params, apply


def _perturb(params, column, scale=0.5):
  name = f'column_{column}'
  return {k: (jax.tree.map(lambda p: p + scale, v) if k == name else v)
          for k, v in params.items()}


@pytest.fixture(scope='module')
def mlp():
  x = np.random.default_rng(0).normal(size=(5, 2, 2)).astype(np.float32)
  return (x,) + _setup(MLP, x, 3)


@pytest.fixture(scope='module')
def conv():
  x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
  return (x,) + _setup(CONV, x, 2)


def test_mlp_shapes_and_column_0_is_a_plain_mlp(mlp):
  x, params, apply = mlp
  assert sorted(params) == ['column_0', 'column_1', 'column_2']
  assert 'adapter_1' not in params['column_0']
  # Column 2's adapter reduces the 2 earlier columns' 8 units to 8.
  assert params['column_2']['adapter_1']['reduce']['kernel'].shape == (16, 8)
  assert params['column_2']['adapter_out']['reduce']['kernel'].shape == (12, 6)
  for k in range(3):
    assert apply(params, x, k).shape == (5, 3)
  np.testing.assert_allclose(apply(params, x, 0),
                             _numpy_column0(params['column_0'], x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['mlp', 'conv'])
def test_laterals_feed_forward_only(name, request):
  x, params, apply = request.getfixturevalue(name)
  last = 2 if name == 'mlp' else 1
  out = apply(params, x, last)
  # Perturbing column 0 changes the later column's output...
  changed = apply(_perturb(params, 0), x, last)
  assert np.abs(np.asarray(changed - out)).max() > 1e-3
  # ...but a later column never changes column 0's output.
  np.testing.assert_array_equal(apply(_perturb(params, last), x, 0),
                                apply(params, x, 0))


@pytest.mark.parametrize('name', ['mlp', 'conv'])
def test_training_a_column_leaves_earlier_columns_bit_identical(name, request):
  x, params, apply = request.getfixturevalue(name)
  model = MLP if name == 'mlp' else CONV
  column = 1
  y = np.arange(len(x)) % 3
  tx = progressive.freeze_others(optax.adamw(0.05, weight_decay=0.1), params,
                                 column)

  def loss_fn(p):
    logits = model.apply({'params': p}, x, column=column)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train(params):
    def step(carry, _):
      p, s = carry
      grads = jax.grad(loss_fn)(p)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), grads
    (params, _), grads = jax.lax.scan(step, (params, tx.init(params)), None,
                                      length=4)
    return params, grads

  before = apply(params, x, 0)
  new, grads = train(params)
  np.testing.assert_array_equal(apply(new, x, 0), before)
  def ce(logits):  # NumPy cross-entropy of the trained column.
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(len(z)), y])
  assert ce(apply(new, x, column)) < ce(apply(params, x, column))
  for k in params:
    same = jax.tree.leaves(jax.tree.map(np.array_equal, params[k], new[k]))
    if k == f'column_{column}':
      assert not any(same)
    else:
      assert all(same)  # Earlier and later columns untouched (decay included).
  # No gradient reaches earlier columns through the laterals.
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads['column_0']))


def test_trainable_mask_and_errors(mlp):
  x, params, _ = mlp
  mask = progressive.trainable_mask({'params': params}, 1)
  assert all(jax.tree.leaves(mask['params']['column_1']))
  assert not any(jax.tree.leaves(mask['params']['column_0']))
  assert not any(jax.tree.leaves(mask['params']['column_2']))
  with pytest.raises(ValueError, match='no parameters under'):
    progressive.trainable_mask(params, 5)
  with pytest.raises(ValueError, match=r'column must be an int in \[0, 3\)'):
    MLP.apply({'params': params}, x, column=3)
  with pytest.raises(ValueError, match=r'\[B, H, W, C\]'):
    CONV.apply({'params': {}}, jnp.ones((2, 8, 8)), column=0)


def test_train_column_only_zeroes_every_other_columns_update():
  updates = {'column_0': {'w': jnp.ones(2)}, 'column_1': {'w': jnp.full(2, 2.0)}, 'shared': jnp.full(3, 3.0)}
  tx = progressive.train_column_only(1)
  out, _ = jax.jit(tx.update)(updates, tx.init(updates))
  np.testing.assert_array_equal(out['column_0']['w'], [0, 0])  # Frozen.
  np.testing.assert_array_equal(out['column_1']['w'], [2, 2])  # The column being trained.
  np.testing.assert_array_equal(out['shared'], [3, 3, 3])  # Outside every column: untouched.
  with pytest.raises(ValueError, match='column must be an int >= 0'):
    progressive.train_column_only(jnp.asarray(1))  # A traced column cannot be folded away.


def _step_cost(num_columns: int, column: int) -> tuple[float, int]:
  """(bytes the compiled SGD step of `column` moves, bytes of all parameters) for a net of `num_columns` columns."""
  model = progressive.ProgressiveMLP(hidden=(64, 64), num_classes=10, num_columns=num_columns)
  x, y = jnp.ones((4, 32)), jnp.arange(4)
  params = model.init(jax.random.key(0), x, column=num_columns - 1)['params']
  tx = optax.chain(optax.sgd(0.1), progressive.train_column_only(column))

  def step(params, opt_state):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply({'params': p}, x, column=column), y).mean()
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  cost = jax.jit(step, donate_argnums=(0,)).lower(params, tx.init(params)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost['bytes accessed'], sum(4 * v.size for v in jax.tree.leaves(params))


@pytest.mark.parametrize('column', [0, 1])
def test_a_columns_step_costs_the_same_however_many_frozen_columns_follow(column):
  """The speed guard: frozen columns' updates are constant zeros, so XLA drops their gradients and parameter writes
  and a step of `column` moves the same bytes with 2 or 8 columns; updating them (the column a traced value) read
  and wrote each frozen byte at least twice."""
  moved_small, size_small = _step_cost(2, column)
  moved_large, size_large = _step_cost(8, column)
  assert moved_large - moved_small < 0.01 * (size_large - size_small), (moved_small, moved_large)
