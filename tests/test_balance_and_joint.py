"""Training on several tasks' memories at once: the final balancing fine-tune (its step against a hand-written loss,
and a run where it recovers forgotten tasks) and the joint upper bound's step."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clflax.trainer import setup
from clflax.configs import validation
from clflax.trainer import consolidate
from clflax import cli
from clflax.trainer import steps
from clflax.trainer import train
from clflax.strategies import replay
from configs import joint
from configs import permuted_mnist


def _three_task_memories(config):
  """A small MLP and per-task memories of 6 random examples each (= the batch size: every example in the batch)."""
  config.model.hidden = (8,)
  config.train.batch_size = 6
  config.train.loss_weights = {'task2': 1.0, 'task3': 2.0, 'task4': 0.5}
  model = setup.build_model(config)
  rng = np.random.default_rng(0)
  memories, reference = {}, {}
  for task in config.tasks:
    examples = {'image': rng.normal(size=(6, 784)).astype(np.float32),
                'label': rng.integers(0, 10, size=6).astype(np.int32)}
    buffer = replay.init(6, jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), consolidate.with_valid(examples)))
    memories[task] = replay.append(buffer, consolidate.with_valid(examples))
    reference[task] = examples
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))['params']
  return model, params, memories, reference


def _weighted_ce(model, params, examples, weight):
  """Hand-written: weight * mean cross-entropy of the MLP on the examples."""
  logits = model.apply({'params': params}, examples['image'])
  picked = jnp.take_along_axis(jax.nn.log_softmax(logits), examples['label'][:, None], axis=1)
  return weight * -jnp.mean(picked)


def test_balance_step_is_sgd_on_the_mean_of_every_tasks_memory_loss():
  config = permuted_mnist.get_config('vanilla,smoke')
  model, params, memories, reference = _three_task_memories(config)
  lr = 0.3
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, {}, optax.sgd(lr).init(params), jax.random.PRNGKey(1))
  new_state, metrics = steps.balance_step(state, steps.Context(memories, {}), model=model, tx=optax.sgd(lr),
                                          all_tasks=tuple(config.tasks), config=config)

  def hand_written(p):  # Mean over tasks of weight * mean cross-entropy on the whole memory.
    return sum(_weighted_ce(model, p, ex, config.train.loss_weights[t]) for t, ex in reference.items()) / 3

  want_loss, want_grads = jax.value_and_grad(hand_written)(params)
  np.testing.assert_allclose(metrics['total'], want_loss, rtol=1e-5)
  want = jax.tree.map(lambda p, g: p - lr * g, params, want_grads)
  jax.tree.map(lambda got, w: np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-6), new_state.params, want)
  assert int(new_state.step) == 1


def test_balancing_fine_tune_recovers_forgotten_tasks_and_reports_both_rows(shared_data, tmp_path):
  config = permuted_mnist.get_config('vanilla,smoke')
  config.data_dir = str(shared_data)
  config.train.balance_memory_per_task = 100  # The memories the fine-tune trains on.
  config.train.balance_finetune_steps = 200
  config.train.log_every_steps = 50
  assert cli.run(config, str(tmp_path)) == 0
  with open(tmp_path / 'results.json') as f:
    results = json.load(f)
  before = np.mean([results['before_balance'][t]['acc'] for t in ('task2', 'task3')])
  after = np.mean(results['metrics']['acc'][-1][:2])
  assert after > before + 5, (before, after)  # Vanilla forgot tasks 2-3; their memories bring them back.
  assert len(results['curves']['balance']) == 200
  assert 'balancing fine-tune of 200 steps' in (tmp_path / 'summary.md').read_text()
  assert cli.run(config, str(tmp_path)) == 0  # Rerun: finished, nothing redone.
  with open(tmp_path / 'results.json') as f:
    assert json.load(f)['metrics'] == results['metrics']


def test_joint_step_adds_every_other_tasks_whole_loss():
  config = permuted_mnist.get_config('vanilla,smoke')
  model, params, memories, reference = _three_task_memories(config)
  config.train.joint = True
  lr, task = 0.3, 'task3'
  others = ('task2', 'task4')
  batch = consolidate.with_valid({'image': jnp.asarray(reference[task]['image'][::-1]),
                                  'label': jnp.asarray(reference[task]['label'][::-1])})
  state = steps.TrainState(jnp.zeros((), jnp.int32), params, {}, optax.sgd(lr).init(params), jax.random.PRNGKey(1))
  new_state, metrics = steps.train_step(state, batch, steps.Context(memories, {}), model=model, tx=optax.sgd(lr),
                                        task=task, earlier=others, config=config)

  def hand_written(p):  # Every task at its own weight: the current batch plus each other task's whole set.
    return sum(_weighted_ce(model, p, reference[t], config.train.loss_weights[t]) for t in (task, *others))

  want_loss, want_grads = jax.value_and_grad(hand_written)(params)
  np.testing.assert_allclose(metrics['total'], want_loss, rtol=1e-5)
  want = jax.tree.map(lambda p, g: p - lr * g, params, want_grads)
  jax.tree.map(lambda got, w: np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-6), new_state.params, want)


def test_joint_config_is_refused_with_a_strategy_or_on_the_classic_protocols():
  config = joint.get_config('smoke')
  validation.validate(config)
  config.strategy.names = ('agem',)
  with pytest.raises(ValueError, match='strategy.names to naive'):
    validation.validate(config)
  classic = permuted_mnist.get_config('vanilla,smoke')
  classic.train.joint = True
  with pytest.raises(ValueError, match='classic.joint'):
    validation.validate(classic)
