"""MER against a plain NumPy loop with closed-form least-squares gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clflax.trainer import setup
from clflax.strategies import mer

S, K, M, D = 3, 4, 2, 3  # Batches, steps per batch, examples per step, inputs.


def _loss(params, b):
  """Mean squared error of a linear model (b: x [M, D], y [M])."""
  pred = b['x'] @ params['w'] + params['b']
  return jnp.mean(jnp.square(pred - b['y']))


def _numpy_grad(w, bias, x, y):
  r = x @ w + bias - y
  return 2 * x.T @ r / len(y), 2 * np.mean(r)


def _numpy_mer(w, bias, xs, ys, lr, beta, gamma):
  w_a, b_a = w.copy(), bias
  for i in range(S):
    w_b, b_b = w.copy(), bias
    for j in range(K):
      gw, gb = _numpy_grad(w, bias, xs[i, j], ys[i, j])
      w, bias = w - lr * gw, bias - lr * gb
    w, bias = w_b + beta * (w - w_b), b_b + beta * (bias - b_b)
  return w_a + gamma * (w - w_a), b_a + gamma * (bias - b_a)


def _problem(seed):
  rng = np.random.default_rng(seed)
  params = {'w': rng.normal(size=D), 'b': np.float64(rng.normal())}
  xs = rng.normal(size=(S, K, M, D))
  ys = rng.normal(size=(S, K, M))
  return params, xs, ys


@jax.jit
def _mer(params, batches, lr, beta, gamma):
  return mer.mer_step(params, _loss, batches, lr, beta, gamma)


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def test_matches_python_loop():
  params, xs, ys = _problem(0)
  for lr, beta, gamma in ((0.05, 0.3, 0.5), (0.1, 1.0, 0.2), (0.02, 0.7, 1.0)):
    got = _mer(_f32(params), _f32({'x': xs, 'y': ys}), lr, beta, gamma)
    want_w, want_b = _numpy_mer(params['w'], params['b'], xs, ys, lr, beta,
                                gamma)
    np.testing.assert_allclose(got['w'], want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got['b'], want_b, rtol=1e-5, atol=1e-6)


def test_unit_rates_are_plain_sgd_over_all_steps():
  params, xs, ys = _problem(1)
  w, bias = params['w'], params['b']
  for x, y in zip(xs.reshape(S * K, M, D), ys.reshape(S * K, M)):
    gw, gb = _numpy_grad(w, bias, x, y)
    w, bias = w - 0.1 * gw, bias - 0.1 * gb
  got = _mer(_f32(params), _f32({'x': xs, 'y': ys}), 0.1, 1.0, 1.0)
  np.testing.assert_allclose(got['w'], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['b'], bias, rtol=1e-5, atol=1e-6)


def test_mer_batches_put_the_current_example_in_every_batch():
  current = {'x': np.arange(2, dtype=np.float32).reshape(1, 2),
             'y': np.array([7], np.int32)}
  memory = {'x': np.arange(12, dtype=np.float32).reshape(3, 2, 2) + 10,
            'y': np.arange(6, dtype=np.int32).reshape(3, 2) + 100}
  got = mer.mer_batches(current, memory)
  assert got['x'].shape == (3, 3, 2) and got['y'].shape == (3, 3)
  for i in range(3):
    np.testing.assert_array_equal(got['y'][i], [7, 100 + 2 * i, 101 + 2 * i])
    np.testing.assert_array_equal(got['x'][i, 0], [0.0, 1.0])
    np.testing.assert_array_equal(got['x'][i, 1:], memory['x'][i])


def test_bad_inputs_raise():
  params, xs, ys = _problem(2)
  with pytest.raises(ValueError, match='beta must be > 0'):
    mer.mer_step(params, _loss, {'x': xs, 'y': ys}, 0.1, 0.0, 1.0)
  with pytest.raises(ValueError, match=r'leading axes \[s, k\]'):
    mer.mer_step(params, _loss, {'x': xs, 'y': ys[0]}, 0.1, 1.0, 1.0)
  with pytest.raises(ValueError, match='memory leaves must be'):
    mer.mer_batches({'x': np.ones((1, 2))}, {'x': np.ones((3, 2, 5))})


@pytest.mark.parametrize('memory_filled', [False, True])
def test_trainer_step_is_reptile_over_the_batch_and_memory_batches(memory_filled):
  """The trainer's MER step on the MLP against a Python loop of SGD steps with hand-written cross-entropy."""
  from clflax.trainer import consolidate
  from clflax.trainer import steps
  import optax  # pylint: disable=g-import-not-at-top
  from clflax.strategies import replay  # pylint: disable=g-import-not-at-top
  from configs import permuted_mnist  # pylint: disable=g-import-not-at-top
  config = permuted_mnist.get_config('mer,smoke')
  config.model.hidden = (8,)
  lr, beta, gamma, s = 0.2, 0.3, 0.7, 3
  config.train.learning_rate, config.strategy.mer.beta, config.strategy.mer.gamma = lr, beta, gamma
  config.strategy.mer.batches, config.strategy.mer.steps = s, 2
  model = setup.build_model(config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))['params']
  rng = np.random.default_rng(0)
  batch = consolidate.with_valid({'image': rng.normal(size=(4, 784)).astype(np.float32),
                                  'label': rng.integers(0, 10, size=4).astype(np.int32)})
  # A memory of 30 copies of ONE example: whatever is drawn, every memory batch is 4 copies of it.
  stored = {'image': rng.normal(size=(784,)).astype(np.float32), 'label': np.int32(7)}
  many = consolidate.with_valid({k: np.stack([v] * 30) for k, v in stored.items()})
  memory = replay.init(30, jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), many))
  if memory_filled:
    memory = replay.append(memory, many)
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, {}, (), jax.random.PRNGKey(1))
  new_state, _ = steps.train_step(state, {k: jnp.asarray(v) for k, v in batch.items()},
                                  steps.Context({replay.SHARED: memory}, {}), model=model, tx=optax.identity(),
                                  task='task2', earlier=('task1',), config=config)

  def ce(p, image, label):
    logits = model.apply({'params': p}, image)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), label[:, None], axis=1))

  def sgd(p, image, label):
    return jax.tree.map(lambda w, g: w - lr * g, p, jax.grad(ce)(p, image, label))

  theta = params
  for _ in range(s):
    start = theta
    theta = sgd(theta, batch['image'], batch['label'])
    if memory_filled:
      theta = sgd(theta, np.stack([stored['image']] * 4), np.full(4, 7, np.int32))
    theta = jax.tree.map(lambda a, b: a + beta * (b - a), start, theta)
  want = jax.tree.map(lambda a, b: a + gamma * (b - a), params, theta)
  jax.tree.map(lambda got, w: np.testing.assert_allclose(got, w, rtol=2e-4, atol=1e-6), new_state.params, want)
