"""Registry: config validation, chain order, every combination under jit."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clflax.strategies import agem
from clflax.strategies import ewc
from clflax.strategies import l2
from clflax.strategies import mas
from clflax.strategies import registry
from clflax.strategies import si

_ORDER = (('si', si.SiState), ('ewc', ewc.EwcState), ('mas', mas.MasState),
          ('l2', l2.L2State), ('agem', optax.EmptyState))


def _cfg(*names):
  cfg = registry.default_config()
  cfg.names = tuple(names)
  return cfg


def _params():
  return {'w': jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), 'b': jnp.ones(2)}


def test_default_config_fields():
  """One section per built-in strategy with fields, each its module's own defaults; the published ones of the
  first strategies kept; names in chain order."""
  config = registry.default_config()
  assert config.names == ('naive',)
  for name, strategy in registry.BUILT_IN.items():
    if strategy.config():
      assert config[name].to_dict() == strategy.config().to_dict()
  assert config.ewc.to_dict() == {'strength': 100., 'decay': 1.0, 'fisher': 'exact', 'fisher_samples': 64}
  assert config.agem.to_dict() == {'memory_per_task': 64, 'ref_batch': 16}
  assert config.gem.to_dict() == {'memory_per_task': 64, 'ref_batch_per_task': 16, 'margin': 0.5}
  order = registry.KNOWN
  # SI reads the raw gradient; penalties before projections; the masks after the base optimizer come last.
  assert order[:2] == ('naive', 'si') and order.index('ewc') < order.index('agem') < order.index('gem')
  assert order[-2:] == ('packnet', 'progressive')
  assert all(registry.BUILT_IN[n].phase == 'update' for n in order[-2:])
  assert all(s.phase == 'gradient' for n, s in registry.BUILT_IN.items() if n not in order[-2:])


def test_every_combination_builds_in_order():
  params = _params()
  known = [n for n in registry.KNOWN if n not in ('tagem', 'packnet', 'mer', 'progressive')]  # Own tests below.
  for r in range(1, len(known) + 1):
    for names in itertools.combinations(known, r):
      tx = registry.build_tx(_cfg(*names), optax.adamw(1e-3), clip_norm=1.0)
      state = tx.init(params)
      want = [t for n, t in _ORDER + (('gem', optax.EmptyState),) if n in names]
      assert [type(s) for s in state[:len(want)]] == want, names
      assert len(state) == len(want) + 2  # + clip + adamw.


def test_tagem_sits_where_agem_does_and_needs_an_example():
  from clflax.strategies import tagem  # pylint: disable=g-import-not-at-top
  example = {'image': np.zeros(4, np.float32), 'label': np.int32(0)}
  tx = registry.build_tx(_cfg('si', 'tagem', 'gem'), optax.sgd(0.1), example=example)
  state = tx.init(_params())
  assert [type(s) for s in state[:3]] == [si.SiState, tagem.TagemState, optax.EmptyState]
  assert state[1].memory.data['image'].shape == (10, 4, 4, 4)  # pools x Q x P x example.
  with pytest.raises(ValueError, match='example'):
    registry.build_tx(_cfg('tagem'), optax.sgd(0.1))
  with pytest.raises(ValueError, match='both agem and tagem'):
    registry.validate(_cfg('agem', 'tagem'))


def test_packnet_comes_after_the_base_optimizer():
  from clflax.strategies import packnet  # pylint: disable=g-import-not-at-top
  cfg = _cfg('ewc', 'packnet')
  state = registry.build_tx(cfg, optax.sgd(0.1, momentum=0.9), clip_norm=1.0).init(_params())
  assert isinstance(state[0], ewc.EwcState) and isinstance(state[-1], packnet.PackNetState)
  cfg.packnet.prune_fraction = 1.0
  with pytest.raises(ValueError, match='prune_fraction must be < 1'):
    registry.validate(cfg)


def test_mer_stands_alone():
  registry.validate(_cfg('mer'))
  with pytest.raises(ValueError, match='mer replaces the optimizer step'):
    registry.validate(_cfg('mer', 'ewc'))
  registry.validate(_cfg('progressive'))
  with pytest.raises(ValueError, match='strategy progressive combines with no other'):
    registry.validate(_cfg('replay', 'progressive'))


def test_transform_combinations_run_under_jit():
  # 'replay' / 'lwf' add no transform: the 32 subsets of the others cover
  # every distinct chain. One jit over all of them: one compilation, not 32.
  params = {'w': jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)}
  grads = jax.tree.map(lambda p: 0.1 * p + 0.05, params)
  ref = jax.tree.map(lambda g: -g, grads)
  names_with_tx = [n for n, _ in _ORDER]
  txs = [registry.build_tx(_cfg('replay', 'lwf', *names), optax.adamw(1e-3))
         for r in range(len(names_with_tx) + 1)
         for names in itertools.combinations(names_with_tx, r)]
  assert len(txs) == 32

  @jax.jit
  def step_all(states):
    return [tx.update(grads, s, params, ref_grads=ref)
            for tx, s in zip(txs, states)]

  states = [tx.init(params) for tx in txs]
  for _ in range(2):  # The states round-trip through jit.
    updates, states = zip(*step_all(states))
    states = list(states)
  for u in updates:
    assert np.all(np.isfinite(u['w'])) and np.any(u['w'] != 0)


def test_full_chain_matches_numpy():
  """si + ewc + mas + l2 penalties, then A-GEM, then clipping, then SGD."""
  rng = np.random.default_rng(0)
  tree = lambda: {'w': rng.normal(size=(3, 2)).astype(np.float32),
                  'b': rng.normal(size=(2,)).astype(np.float32)}
  flat = lambda t: np.concatenate([np.ravel(t['w']), t['b']]).astype(np.float64)
  params, g = tree(), tree()
  weights = {k: jax.tree.map(np.abs, tree()) for k in ('si', 'ewc', 'mas')}
  anchors = {k: tree() for k in ('si', 'ewc', 'mas', 'l2')}
  cfg = _cfg('si', 'ewc', 'mas', 'l2', 'agem')
  lr, clip = 0.1, 0.5
  tx = registry.build_tx(cfg, optax.sgd(lr), clip_norm=clip)
  state = tx.init(params)
  state = registry.replace_state(state, si.SiState, lambda s: s._replace(
      importance=weights['si'], anchor=anchors['si']))
  state = registry.replace_state(state, ewc.EwcState, lambda s: ewc.consolidate(
      s, anchors['ewc'], weights['ewc']))
  state = registry.replace_state(state, mas.MasState, lambda s: mas.consolidate(
      s, anchors['mas'], weights['mas']))
  state = registry.replace_state(state, l2.L2State,
                                 lambda s: l2.consolidate(s, anchors['l2']))
  p = flat(params)
  total = (flat(g)
           + cfg.si.strength * flat(weights['si']) * (p - flat(anchors['si']))
           + cfg.ewc.strength * flat(weights['ewc']) * (p - flat(anchors['ewc']))
           + cfg.mas.strength * flat(weights['mas']) * (p - flat(anchors['mas']))
           + cfg.l2.strength * (p - flat(anchors['l2'])))
  r = -total + rng.normal(size=8)  # A conflicting memory gradient.
  assert total @ r < 0
  proj = total - (total @ r) / (r @ r) * r
  proj *= min(1.0, clip / np.linalg.norm(proj))
  unflat = lambda v: {'w': v[:6].reshape(3, 2).astype(np.float32),
                      'b': v[6:].astype(np.float32)}
  updates, _ = jax.jit(tx.update)(g, state, params, ref_grads=unflat(r))
  np.testing.assert_allclose(flat(updates), -lr * proj, rtol=1e-4, atol=1e-6)


def _set(path, value):
  """Edits a plain-dict config (ConfigDict itself refuses type changes)."""
  def edit(cfg):
    *parents, leaf = path.split('.')
    for p in parents:
      cfg = cfg[p]
    if value is _DELETE:
      del cfg[leaf]
    else:
      cfg[leaf] = value
  return edit


_DELETE = object()


@pytest.mark.parametrize('edit,match', [
    (_set('names', ('ewc', 'gemm')), "unknown strategy 'gemm'"),
    (_set('names', 'ewc'), 'strategy.names must be a tuple'),
    (_set('names', ()), 'empty'),
    (_set('names', ('ewc', 'ewc')), 'duplicates'),
    (_set('ewc.strength', -1.0), r'strategy.ewc.strength must be >= 0'),
    (_set('ewc.decay', 1.5), r'strategy.ewc.decay must be <= 1'),
    (_set('ewc.fisher', 'diag'), 'strategy.ewc.fisher must be one of'),
    (_set('ewc.fisher_samples', 2.5), 'strategy.ewc.fisher_samples must be an int'),
    (_set('agem.memory_per_task', 0), r'strategy.agem.memory_per_task must be > 0'),
    (_set('agem.ref_batch', -3), r'strategy.agem.ref_batch'),
    (_set('replay.batch', 0), r'strategy.replay.batch'),
    (_set('replay.weight', True), r'strategy.replay.weight must be a number'),
    (_set('lwf.temperature', 0.0), r'strategy.lwf.temperature must be > 0'),
    (_set('si.damping', 0.0), r'strategy.si.damping'),
    (_set('mas.strength', float('nan')), r'strategy.mas.strength'),
    (_set('l2.strength', -0.5), r'strategy.l2.strength'),
    (_set('l2.strength', '0.1'), r'strategy.l2.strength must be a number'),
    (_set('si', _DELETE), r'strategy.si section'),
    (_set('mas.samples', _DELETE), r'strategy.mas.samples is missing'),
])
def test_validate_rejects(edit, match):
  cfg = _cfg('ewc', 'agem', 'replay', 'lwf', 'si', 'mas', 'l2').to_dict()
  assert registry.validate(cfg)  # Valid before the edit.
  edit(cfg)
  with pytest.raises(ValueError, match=match):
    registry.build_tx(cfg, optax.sgd(0.1))


def test_validate_ignores_inactive_sections_and_bad_clip():
  cfg = _cfg('naive')
  cfg.ewc.strength = -1.0  # Not active: not checked.
  assert registry.validate(cfg) == ('naive',)
  for bad in (0.0, -1.0, float('inf')):
    with pytest.raises(ValueError, match='clip_norm'):
      registry.build_tx(cfg, optax.sgd(0.1), clip_norm=bad)


def test_find_and_replace_state():
  params = _params()
  tx = optax.chain(optax.chain(ewc.ewc(1.0), l2.l2(1.0)), agem.agem(),
                   optax.adam(1e-3))
  state = tx.init(params)
  found = registry.find_state(state, ewc.EwcState)
  assert isinstance(found, ewc.EwcState)
  assert registry.find_state(state, mas.MasState) is None
  fisher = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
  new = registry.replace_state(
      state, ewc.EwcState, lambda s: ewc.consolidate(s, params, fisher))
  np.testing.assert_array_equal(
      registry.find_state(new, ewc.EwcState).fisher['b'], [2.0, 2.0])
  # Everything else is untouched, the old state too (pure).
  assert jax.tree.structure(new) == jax.tree.structure(state)
  np.testing.assert_array_equal(found.fisher['b'], [0.0, 0.0])
  np.testing.assert_array_equal(
      registry.find_state(new, l2.L2State).anchor['w'], params['w'])
  with pytest.raises(ValueError, match='no MasState'):
    registry.replace_state(state, mas.MasState, lambda s: s)
  twice = optax.chain(ewc.ewc(1.0), ewc.ewc(2.0)).init(params)
  with pytest.raises(ValueError, match='2 states of type EwcState'):
    registry.find_state(twice, ewc.EwcState)
