"""GEM, DER++, TA-A-GEM, PackNet, MER and Progressive Networks through the trainer: registry, steps against plain-JAX
references, smoke runs."""
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from clflax.data import classic
from clflax.models import classic as classic_models
from clflax.trainer import consolidate
from clflax import cli
from clflax.trainer import steps
from clflax.strategies import der
from clflax.strategies import ewc
from clflax.strategies import registry
from clflax.strategies import replay
from configs import permuted_mnist

TASKS = ('task1', 'task2', 'task3', 'task4')  # T_max = 4; the steps below run stage 3 (two earlier tasks).
M, DIM, CLASSES, LR = 3, 6, 3, 0.5  # Memory rows per task, input width, classes, SGD rate.


def _strategy(*names, **fields):
  cfg = registry.default_config()
  cfg.names = names
  for key, value in fields.items():
    section, field = key.split('__')
    cfg[section][field] = value
  return cfg


def test_registry_accepts_and_validates_gem_and_der():
  for names in (('gem',), ('der',), ('ewc', 'gem'), ('agem', 'gem', 'der', 'replay')):
    assert registry.validate(_strategy(*names)) == names
  state = registry.build_tx(_strategy('ewc', 'gem'), optax.sgd(0.1), clip_norm=1.0).init({'w': jnp.ones(2)})
  assert isinstance(state[0], ewc.EwcState) and isinstance(state[1], optax.EmptyState) and len(state) == 4
  bad = [('gem', 'memory_per_task', 0, 'must be > 0'), ('gem', 'ref_batch_per_task', 2.5, 'must be an int'),
         ('gem', 'margin', -1.0, 'must be >= 0'), ('der', 'batch', 0, 'must be > 0'),
         ('der', 'alpha', float('nan'), 'must be >= 0'), ('der', 'beta', True, 'must be a number')]
  for name, field, value, message in bad:
    cfg = _strategy(name).to_dict()
    cfg[name][field] = value
    with pytest.raises(ValueError, match=f'strategy.{name}.{field} {message}') as err:
      registry.build_tx(cfg, optax.sgd(0.1))
    assert '\n' not in str(err.value)
  cfg = _strategy('der').to_dict()
  del cfg['der']
  with pytest.raises(ValueError, match=r'needs a strategy.der section'):
    registry.validate(cfg)


def _setup(strategy):
  model = classic_models.ClassicNet(hidden=(5,), num_classes=CLASSES)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, DIM)))['params']
  config = ml_collections.ConfigDict({'tasks': TASKS, 'strategy': strategy,
                                      'train': {'loss_weights': {t: 1.0 for t in TASKS},
                                                'balance_finetune_steps': 0, 'balance_memory_per_task': 64,
                                                'joint': False}})
  tx = registry.build_tx(strategy, optax.sgd(LR))
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, {}, tx.init(params), jax.random.PRNGKey(1))
  return model, config, tx, state


def _examples(rng, n, labels=None):
  labels = rng.integers(0, CLASSES, n) if labels is None else labels
  return {'image': rng.normal(size=(n, DIM)).astype(np.float32), 'label': np.asarray(labels, np.int32),
          'valid': np.ones((n,), bool)}


def _shared_memory(blocks, filled):
  """The classic layout: T_max blocks of M rows, the first `filled` of them stored (the rest hold garbage)."""
  garbage = jax.tree.map(lambda x: np.full_like(x, 7), blocks[0])
  data = jax.tree.map(lambda *b: np.concatenate(b), *blocks, *[garbage] * (len(TASKS) - len(blocks)))
  return replay.ReplayBuffer(jax.tree.map(jnp.asarray, data), jnp.asarray(filled * M, jnp.int32),
                             jnp.asarray(filled * M, jnp.int32))


def _ce(model, params, batch):
  logits = model.apply({'params': params}, batch['image'])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)


def _brute_force_dual(p, c, lower):
  """argmin 0.5 v'Pv + c'v s.t. v >= lower: the one KKT point among all active sets."""
  t = len(c)
  for r in range(t + 1):
    for free in map(list, itertools.combinations(range(t), r)):
      v = lower.copy()
      if free:
        rest = [i for i in range(t) if i not in free]
        v[free] = np.linalg.solve(p[np.ix_(free, free)], -(c[free] + p[np.ix_(free, rest)] @ v[rest]))
      grad, tol = p @ v + c, 1e-9 * (np.abs(c).max() + np.abs(p).max())
      if np.all(v[free] >= lower[free] - tol) and np.all(np.delete(grad, free) >= -tol):
        return v
  raise AssertionError('no KKT point')


def test_gem_step_matches_plain_jax_and_brute_force_qp():
  margin = 0.5
  model, config, tx, state = _setup(_strategy('gem', gem__memory_per_task=M, gem__ref_batch_per_task=M,
                                              gem__margin=margin))
  rng = np.random.default_rng(0)
  batch = _examples(rng, 4)
  # Task 1's memory: the current images with other labels (a conflicting gradient); task 2's: random.
  blocks = [{**{k: v[:M] for k, v in batch.items()}, 'label': (batch['label'][:M] + 1) % CLASSES}, _examples(rng, M)]
  g = jax.grad(_ce, argnums=1)(model, state.params, batch)
  task_g = np.stack([_flat(jax.grad(_ce, argnums=1)(model, state.params, b)) for b in blocks])
  dots = task_g @ _flat(g)
  assert np.any(dots < 0), dots  # A projection happens.
  v = _brute_force_dual(task_g @ task_g.T, dots, np.full(2, margin))
  want = _flat(state.params) - LR * (_flat(g) + task_g.T @ v)

  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, task='task3', earlier=(), config=config))
  shared = steps.Context({replay.SHARED: _shared_memory(blocks, 2)}, {})
  got, _ = step(state, batch, shared)
  np.testing.assert_allclose(_flat(got.params), want, rtol=1e-4, atol=1e-5)
  # Stage 2 (one filled block): the same compiled step, constrained by task 1 only.
  step(state, batch, steps.Context({replay.SHARED: _shared_memory(blocks[:1], 1)}, {}))
  assert step._cache_size() == 1
  # Per-task memories (vision layout): one gradient per earlier task, the same update.
  per_task = {t: replay.append(replay.init(M, jax.tree.map(lambda x: x[0], b)), b) for t, b in zip(TASKS, blocks)}
  per_task_step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, task='task3',
                                            earlier=TASKS[:2], config=config))
  got, _ = per_task_step(state, batch, steps.Context(per_task, {}))
  np.testing.assert_allclose(_flat(got.params), want, rtol=1e-4, atol=1e-5)


def test_derpp_step_loss_matches_hand_computed():
  alpha, beta = 0.3, 0.7
  model, config, tx, state = _setup(_strategy('der', der__memory_per_task=M, der__batch=2 * M, der__alpha=alpha,
                                              der__beta=beta))
  rng = np.random.default_rng(1)
  batch = _examples(rng, 4)
  # Two filled blocks (2 M rows) and der.batch = 2 M: each replay term samples every stored row, in some order.
  blocks = [dict(b, **{der.LOGITS: rng.normal(size=(M, CLASSES)).astype(np.float32)})
            for b in (_examples(rng, M), _examples(rng, M))]
  context = steps.Context({replay.SHARED: _shared_memory(blocks, 2)}, {})
  stored = jax.tree.map(lambda *b: np.concatenate(b), *blocks)

  def hand_loss(params):
    mem_logits = model.apply({'params': params}, stored['image'])
    return (_ce(model, params, batch) + alpha * jnp.mean((mem_logits - stored[der.LOGITS]) ** 2)
            + beta * _ce(model, params, stored))

  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, task='task3', earlier=(), config=config))
  got, metrics = step(state, batch, context)
  np.testing.assert_allclose(metrics['total'], hand_loss(state.params), rtol=1e-5)
  np.testing.assert_allclose(metrics['der'], hand_loss(state.params) - _ce(model, state.params, batch), rtol=1e-5)
  want = _flat(state.params) - LR * _flat(jax.grad(hand_loss)(state.params))
  np.testing.assert_allclose(_flat(got.params), want, rtol=1e-5, atol=1e-6)


def test_consolidate_stores_der_logits_in_task_blocks():
  model, config, _, state = _setup(_strategy('der', 'gem', der__memory_per_task=M, gem__memory_per_task=2))
  rng = np.random.default_rng(2)
  variables = {'params': state.params, 'batch_stats': {}}
  memories = consolidate.initial_memories(config, model, variables, {t: _examples(rng, 2) for t in TASKS}, True)
  context = steps.Context(memories, {})
  short = {k: v for k, v in _examples(rng, 2).items() if k != 'valid'}  # Fewer than M: repeated to fill the block.
  for task in TASKS[:2]:
    _, context = consolidate.consolidate(state, context, task, TASKS.index(task), short, model=model, config=config)
  memory = context.memories[replay.SHARED]
  assert int(memory.size) == 2 * M
  rows = np.arange(2 * M) % 2
  np.testing.assert_array_equal(memory.data['image'][:2 * M], short['image'][np.r_[rows[:M], rows[:M]]])
  np.testing.assert_allclose(memory.data[der.LOGITS][:2 * M],
                             model.apply({'params': state.params}, memory.data['image'][:2 * M]), rtol=1e-5, atol=1e-6)


def _scores(workdir):
  with open(workdir / 'results.json') as f:
    matrix = np.asarray(json.load(f)['metrics']['acc'])
  return matrix[-1].mean(), np.mean([matrix[:-1, j].max() - matrix[-1, j] for j in range(matrix.shape[1] - 1)])


def test_gem_derpp_tagem_and_mer_smoke_runs_beat_vanilla(shared_data, tmp_path):
  scores = {}
  for name in ('vanilla', 'gem', 'derpp', 'tagem', 'mer'):
    config = permuted_mnist.get_config(f'{name},smoke')
    config.data_dir = str(shared_data)
    assert cli.run(config, str(tmp_path / name)) == 0
    scores[name] = _scores(tmp_path / name)
  for name in ('gem', 'derpp', 'tagem', 'mer'):
    assert scores[name][0] > scores['vanilla'][0], scores  # Final mean accuracy A_T.
    assert scores[name][1] < scores['vanilla'][1], scores  # Forgetting.


@pytest.mark.parametrize('name', ['tagem', 'mer', 'progressive'])
def test_classic_only_strategies_are_refused_on_the_vision_stages(name):
  from clflax.configs import validation  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config('smoke')
  config.strategy.names = (name,)
  with pytest.raises(ValueError, match='classic protocols only'):
    validation.validate(config)


@pytest.mark.parametrize('name,learned', [('packnet', 60), ('progressive', 40)])
def test_task_aware_runs_keep_every_task_exactly_and_still_learn_each(shared_data, tmp_path, name, learned):
  config = permuted_mnist.get_config(f'{name},smoke')
  config.data_dir = str(shared_data)
  assert cli.run(config, str(tmp_path)) == 0
  with open(tmp_path / 'results.json') as f:
    matrix = np.asarray(json.load(f)['metrics']['acc'])
  for j in range(3):  # Each task tested with its own weights / column: later stages cannot change its score at all.
    np.testing.assert_array_equal(matrix[j:, j], matrix[j, j])
    assert matrix[j, j] > learned, matrix  # ...and every task still learned (chance: 10).


def test_packnet_is_refused_on_the_vision_stages_and_with_the_balancing_fine_tune():
  from clflax.configs import validation  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config('smoke')
  config.strategy.names = ('packnet',)
  with pytest.raises(ValueError, match='classic protocols only'):
    validation.validate(config)
  config = permuted_mnist.get_config('packnet,smoke')
  config.train.balance_finetune_steps = 10
  with pytest.raises(ValueError, match='frozen weights'):
    validation.validate(config)
