"""PackNet: exact per-layer pruning vs NumPy, frozen weights under optax, masks."""
import jax
import numpy as np
import optax
import pytest

from clflax.strategies import packnet


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {'dense': {'kernel': rng.normal(size=(6, 5)).astype(np.float32),
                    'bias': rng.normal(size=(5,)).astype(np.float32)},
          'head': {'kernel': rng.normal(size=(5, 3)).astype(np.float32)}}


_prune = jax.jit(packnet.prune)


def _numpy_prune(w, owners, task, fraction):
  """Per-layer: zero the floor(fraction * n) smallest |w| owned by task."""
  w, owners = w.copy(), owners.copy()
  mine = np.flatnonzero(owners.ravel() == task)
  k = int(np.floor(fraction * len(mine)))
  order = mine[np.argsort(np.abs(w.ravel()[mine]), kind='stable')][:k]
  w.ravel()[order] = 0
  owners.ravel()[order] = -1
  return w, owners


@pytest.mark.parametrize('fraction', [0.5, 0.75, 0.3])
def test_prune_is_exact_per_layer(fraction):
  params = _params(1)
  rng = np.random.default_rng(2)
  # Task 1 owns a random part; task 0 and free weights elsewhere.
  owners = jax.tree.map(
      lambda p: rng.choice([0, 1, 1, 1], size=p.shape).astype(np.int32), params)
  new_params, new_owners = _prune(params, owners, 1, fraction)
  for path in (('dense', 'kernel'), ('head', 'kernel')):
    w, o = params[path[0]][path[1]], owners[path[0]][path[1]]
    want_w, want_o = _numpy_prune(w, o, 1, fraction)
    np.testing.assert_array_equal(new_params[path[0]][path[1]], want_w)
    np.testing.assert_array_equal(new_owners[path[0]][path[1]], want_o)
    n = np.sum(o == 1)
    assert np.sum((o == 1) & (np.asarray(new_owners[path[0]][path[1]]) == -1)) \
        == int(np.floor(fraction * n))
  # Biases are never pruned; task 0's weights are untouched.
  np.testing.assert_array_equal(new_params['dense']['bias'],
                                params['dense']['bias'])
  np.testing.assert_array_equal(new_owners['dense']['bias'],
                                owners['dense']['bias'])


def test_claim_keeps_earlier_tasks_and_frees_unselected():
  owners = {'a': np.array([0, 0, 1, 2, -1, -1], np.int32),
            'b': np.array([-1, 2], np.int32)}
  where = {'a': np.array([True, True, True, True, True, False]), 'b': False}
  got = packnet.claim(owners, 2, where)
  np.testing.assert_array_equal(got['a'], [0, 0, 1, 2, 2, -1])
  np.testing.assert_array_equal(got['b'], [-1, -1])
  got = packnet.claim(owners, 1)  # Re-running task 1: resets tasks >= 1.
  np.testing.assert_array_equal(got['a'], [0, 0, 1, 1, 1, 1])


def _train(params, state, tx, opt_state, steps, key):
  """`steps` random-gradient steps of tx, with `state` as packnet's state."""
  def step(carry, k):
    params, opt_state = carry
    leaves, treedef = jax.tree.flatten(params)
    grads = treedef.unflatten([jax.random.normal(jax.random.fold_in(k, i), p.shape)
                               for i, p in enumerate(leaves)])
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None
  opt_state = (opt_state[0], state)
  (params, opt_state), _ = jax.lax.scan(step, (params, opt_state),
                                        jax.random.split(key, steps))
  return params, opt_state


def test_frozen_weights_never_change_over_three_tasks():
  params = _params(3)
  tx = optax.chain(optax.adamw(0.05, weight_decay=0.1), packnet.packnet())
  opt_state = tx.init(params)
  train = jax.jit(_train, static_argnums=(2, 4))  # Compiled once: 4 steps.
  history = []
  state = opt_state[1]
  for task in range(3):
    state = packnet.start_task(state, task)
    before = params
    params, opt_state = train(params, state, tx, opt_state, 4, jax.random.key(task))
    mine = jax.tree.map(lambda o: np.asarray(o) == task, state.owners)
    for b, a, m in zip(*map(jax.tree.leaves, (before, params, mine))):
      np.testing.assert_array_equal(np.asarray(a)[~m], np.asarray(b)[~m])
      assert np.all(np.asarray(a)[m] != np.asarray(b)[m])
    params, owners = _prune(params, state.owners, task, 0.5)
    state = state._replace(owners=owners)
    pruned = params
    params, opt_state = train(params, state, tx, opt_state, 4,
                              jax.random.key(10 + task))
    for b, a, o in zip(*map(jax.tree.leaves, (pruned, params, owners))):
      o = np.asarray(o)
      # Only the task's kept weights moved; freed ones stay exactly 0.
      np.testing.assert_array_equal(np.asarray(a)[o != task],
                                    np.asarray(b)[o != task])
      assert np.all(np.asarray(a)[o == -1] == 0)
    history.append(jax.tree.map(np.asarray, (params, owners)))

  # Inference masks: task t sees exactly the weights of tasks <= t, which
  # have not changed since task t finished.
  final_params, final_owners = history[-1]
  for t, (params_t, _) in enumerate(history):
    got = packnet.task_params(final_params, final_owners, t)
    for g, p_t, o in zip(*map(jax.tree.leaves, (got, params_t, final_owners))):
      keep = (o >= 0) & (o <= t)
      np.testing.assert_array_equal(np.asarray(g)[keep], p_t[keep])
      assert np.all(np.asarray(g)[~keep] == 0)
  # Biases belong to task 0 (never pruned, frozen afterwards).
  assert np.all(final_owners['dense']['bias'] == 0)
  assert {0, 1, 2} <= set(np.unique(final_owners['dense']['kernel']).tolist())


def test_bad_inputs_raise():
  params = _params()
  owners = packnet.init_owners(params)
  with pytest.raises(ValueError, match='fraction must be in'):
    packnet.prune(params, owners, 0, 1.0)
  with pytest.raises(ValueError, match='structure'):
    packnet.prune(params, {'dense': owners['dense']}, 0, 0.5)
  with pytest.raises(ValueError, match='where must have'):
    packnet.claim(owners, 0, {'dense': True})
