"""Every registered strategy, and one defined outside clflax, meets the Strategy contract (strategies/base.py), as
optax's `_common_test.py` holds every optax transform to its contract:

* its train step (loss terms, update arguments, transform or update of its own) gives the same result with and
  without jit (chex variants), after a consolidated first task, i.e. with memories, Fisher and anchors in play;
* its state (in the optax state and the context) is a pytree that survives an Orbax round trip unchanged;
* before anything is consolidated its first step is plain fine-tuning's, where that is its contract;
* it composes with every other composable strategy in one chain;
* a smoke run of two stages through the real trainer completes with finite scores.

A tiny classic-protocol MLP on fake digits keeps every compile to a fraction of a second.
"""
import json
import os
import tempfile

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import fake_data
import user_strategy
from clflax import cli
from clflax.configs import mnist
from clflax.data import inputs
from clflax.strategies import registry
from clflax.trainer import consolidate
from clflax.trainer import optim
from clflax.trainer import setup
from clflax.trainer import steps
from clflax.trainer.state import Context

OUTSIDE = 'user_strategy:L2_INIT'  # Registered by its import path; its module is not clflax's.
ALL = registry.KNOWN + (OUTSIDE,)
# Their contract is not "the first step is plain fine-tuning's": an update of its own, a model of its own.
OWN_FIRST_STEP = {'mer': 'Reptile steps instead of one SGD step', 'progressive': 'a Progressive Network'}
TASKS, BATCH, STEPS = ('task2', 'task3'), 4, 5


def _config(*names):
  config = mnist.permuted('vanilla,smoke')
  config.model.hidden = (8,)
  config.tasks = TASKS
  config.classic.num_tasks, config.classic.skip_tasks = 3, 1
  config.train.batch_size = config.train.eval_batch_size = BATCH
  config.train.steps_per_epoch, config.train.log_every_steps, config.train.checkpoint_every_steps = STEPS, 2, 2
  config.train.learning_rate = 0.2
  config.strategy.names = names
  strategy = config.strategy
  for section in ('agem', 'replay', 'gem', 'der', 'mer'):
    strategy[section].memory_per_task = 6
  strategy.agem.ref_batch = strategy.replay.batch = strategy.der.batch = 3
  strategy.gem.ref_batch_per_task = 3
  strategy.der.beta = 0.5
  strategy.ewc.fisher_samples = strategy.mas.samples = 4
  strategy.tagem.clusters, strategy.tagem.per_cluster, strategy.tagem.ref_batch = 2, 2, 3
  strategy.l2init = user_strategy.L2_INIT.config()
  strategy.lwf.weight = strategy.l2.strength = strategy.si.strength = 0.5
  return config


def _data(config):
  train = {t: fake_data.digits(BATCH * STEPS, seed=i) for i, t in enumerate(config.tasks)}
  val = {t: fake_data.digits(BATCH * 2, seed=10 + i) for i, t in enumerate(config.tasks)}
  return inputs.from_arrays(train, val, batch_size=BATCH, eval_batch_size=BATCH, seed=config.seed)


def _stage(config, model, tree_state, context, k):
  """The state at the start of stage k, as the trainer starts one (strategies' `start_stage` applied)."""
  task = config.tasks[k]
  data = _data(config)
  tx = optim.make_tx(config, STEPS, data.example_batches[task], stage=k, task=task)
  state = tree_state._replace(opt_state=optim.fresh_optimizer_state(config, tx, tree_state.params,
                                                                    tree_state.opt_state))
  for s in registry.resolve(config.strategy.names):
    if s.start_stage is not None:
      state = s.start_stage(registry.section(config.strategy, s), state, k)
  return tx, state


def _start(config):
  """(model, tx of stage 0, state, context, data) of a fresh run."""
  data = _data(config)
  model = setup.build_model(config)
  variables = setup._init_variables(config, model, data)  # pylint: disable=protected-access
  tx = optim.make_tx(config, STEPS, data.example_batches[TASKS[0]], stage=0, task=TASKS[0])
  state = optim.initial_state(config, variables, tx)
  memories = consolidate.initial_memories(config, model, variables, data.example_batches, shared=True)
  teacher = variables if registry.needs(config.strategy).teacher else {}
  return model, tx, state, Context(memories, teacher), data


def _after_first_task(config):
  """Stage 2's step inputs after stage 1 trained one step and was consolidated."""
  model, tx, state, context, data = _start(config)
  state, _ = steps.train_step(state, data.train_sets[TASKS[0]][0], context, model=model, tx=tx, task=TASKS[0],
                              earlier=(), config=config)
  state, context = consolidate.consolidate(state, context, TASKS[0], 0,
                                           data.memory_examples(TASKS[0], consolidate.examples_per_task(config)),
                                           model=model, config=config)
  tx, state = _stage(config, model, state, context, 1)
  return model, tx, state, context, data.train_sets[TASKS[1]][0]


class ConformanceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*ALL)
  def test_step_is_the_same_with_and_without_jit(self, name):
    config = _config(name)
    model, tx, state, context, batch = _after_first_task(config)

    def step(state, batch, context):
      return steps.train_step(state, batch, context, model=model, tx=tx, task=TASKS[1], earlier=TASKS[:1],
                              config=config)

    want_state, want_metrics = step(state, batch, context)
    got_state, got_metrics = self.variant(step)(state, batch, context)
    chex.assert_trees_all_close(got_state, want_state, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got_metrics, want_metrics, rtol=1e-5, atol=1e-6)
    chex.assert_tree_all_finite((got_state.params, got_metrics))
    self.assertEqual(jax.tree.structure(got_state.opt_state), jax.tree.structure(state.opt_state))

  @parameterized.parameters(*ALL)
  def test_state_survives_an_orbax_round_trip(self, name):
    _, _, state, context, _ = _after_first_task(_config(name))
    tree = {'opt_state': state.opt_state, 'context': context}
    with ocp.StandardCheckpointer() as checkpointer:
      path = os.path.join(tempfile.mkdtemp(), 'state')
      checkpointer.save(path, tree)
      checkpointer.wait_until_finished()
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
      restored = checkpointer.restore(path, abstract)
    chex.assert_trees_all_equal(restored, tree)
    chex.assert_trees_all_equal_structs(restored, tree)

  @parameterized.parameters(*[n for n in ALL if n not in OWN_FIRST_STEP])
  def test_first_step_before_any_consolidation_is_plain_fine_tuning(self, name):
    results = []
    for names in ((name,), ('naive',)):
      config = _config(*names)
      model, tx, state, context, data = _start(config)
      new, _ = jax.jit(lambda s, b, c, tx=tx, config=config, model=model: steps.train_step(
          s, b, c, model=model, tx=tx, task=TASKS[0], earlier=(), config=config))(
              state, data.train_sets[TASKS[0]][0], context)
      results.append(new.params)
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-6, atol=1e-7)

  def test_every_strategy_composes_with_every_composable_other(self):
    refused = set()
    for name in ALL:
      for other in ALL:
        if other != name:
          try:
            registry.validate(_config(name, other).strategy)
          except ValueError:
            refused.add(frozenset((name, other)))
    others = lambda n: [o for o in ALL if o not in (n, 'naive')]  # noqa: E731
    alone = {n for n in ALL if all(frozenset((n, o)) in refused for o in others(n))}
    assert alone == set(OWN_FIRST_STEP), alone  # An update or a model of their own: they combine with nothing.
    composable = [n for n in ALL if n not in alone]
    conflicts = {pair for pair in refused if not pair & alone}
    assert conflicts == {frozenset(('agem', 'tagem'))}, conflicts  # The only other refusal: A-GEM twice.
    for dropped in ('tagem', 'agem'):
      config = _config(*[n for n in composable if n not in ('naive', dropped)])
      model, tx, state, context, batch = _after_first_task(config)
      new, metrics = jax.jit(lambda s, b, c: steps.train_step(s, b, c, model=model, tx=tx, task=TASKS[1],
                                                              earlier=TASKS[:1], config=config))(state, batch, context)
      chex.assert_tree_all_finite((new.params, metrics))
      assert {'replay', 'der', 'lwf'} <= set(metrics), metrics  # Every loss term is in the one loss.

  def test_every_strategy_steps_in_bfloat16_with_float32_state(self):
    # Mixed precision: the whole composable chain in one step, and each strategy that combines with none.
    chain = [n for n in ALL if n not in OWN_FIRST_STEP and n not in ('naive', 'tagem')]
    for names in [chain] + [[n] for n in OWN_FIRST_STEP]:
      config = _config(*names)
      config.model.dtype = 'bfloat16'
      model, tx, state, context, batch = _after_first_task(config)
      assert model.dtype == jnp.bfloat16
      new, metrics = jax.jit(lambda s, b, c: steps.train_step(s, b, c, model=model, tx=tx, task=TASKS[1],
                                                              earlier=TASKS[:1], config=config))(state, batch, context)
      chex.assert_tree_all_finite((new.params, metrics))
      floats = [x for x in jax.tree.leaves((new.params, new.opt_state, metrics))
                if jnp.issubdtype(x.dtype, jnp.floating)]
      assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}, (names, {x.dtype for x in floats})

  @parameterized.parameters(*ALL)
  def test_a_smoke_run_through_the_trainer(self, name):
    config = _config(name)
    config.fast_compile = True
    workdir = tempfile.mkdtemp()
    assert cli.run(config, workdir, data=_data(config)) == 0
    with open(os.path.join(workdir, 'results.json')) as f:
      results = json.load(f)
    scores = np.asarray(results['metrics']['acc'])
    assert results['stages'] == list(TASKS) and scores.shape == (2, 2) and np.isfinite(scores).all()
    assert all(np.isfinite(loss) for _, loss in results['curves']['task3'])
