"""The trainer's learning-rate schedule and base optimizer against optax's own leaf-by-leaf constructions."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clflax.trainer import optim
from configs import default


def _optax_sgdr(peak, period, warmup, restarts=8):
  """SGDR as a join of per-period optax schedules (the independent reference)."""
  return optax.join_schedules(
      [optax.warmup_cosine_decay_schedule(0.0, peak, warmup, period, peak * 0.01)]
      + [optax.cosine_decay_schedule(peak, period, 0.01)] * restarts,
      boundaries=[period * (i + 1) for i in range(restarts)])


@pytest.mark.parametrize('period,warmup', [(10, 0), (10, 3), (7, 6), (1, 0), (12, 40)])
def test_sgdr_matches_joined_optax_schedules(period, warmup):
  ours = optim.sgdr_schedule(0.1, period, warmup)
  reference = _optax_sgdr(0.1, period, min(warmup, period - 1))
  for step in range(6 * period + 3):
    np.testing.assert_allclose(float(ours(step)), float(reference(step)), rtol=1e-5, atol=1e-8, err_msg=str(step))
  assert float(jax.jit(ours)(jnp.asarray(2 * period))) == pytest.approx(0.1)  # Restarted at the peak.


@pytest.mark.parametrize('optimizer', ['adamw', 'sgd'])
def test_flattened_base_optimizer_equals_leafwise_optax(optimizer):
  config = default.get_config()  # Its backbone_lr_scale (0.1) does not apply: these params have no backbone.
  config.strategy.names = ('naive',)
  config.train.optimizer, config.train.clip_norm, config.train.momentum = optimizer, 0.5, 0.9
  config.train.weight_decay, config.train.constant_learning_rate = 0.01, True
  tx = optim.make_tx(config, steps_per_epoch=5)
  lr = config.train.learning_rate
  if optimizer == 'adamw':
    base = optax.adamw(lr, weight_decay=0.01)
  else:
    base = optax.chain(optax.add_decayed_weights(0.01), optax.sgd(lr, momentum=0.9))
  reference = optax.chain(optax.clip_by_global_norm(0.5), base)
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), 'b': {'c': jnp.asarray(rng.normal(size=5))}}
  state, ref_state = tx.init(params), reference.init(params)
  ours_p, ref_p = params, params
  for _ in range(4):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = tx.update(grads, state, ours_p)
    ref_updates, ref_state = reference.update(grads, ref_state, ref_p)
    ours_p, ref_p = optax.apply_updates(ours_p, updates), optax.apply_updates(ref_p, ref_updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ours_p, ref_p)
  assert len(jax.tree.leaves(state)) < len(jax.tree.leaves(ref_state))  # Raveled: one vector per moment.


def test_backbone_learning_rate_scale():
  config = default.get_config()
  config.strategy.names = ('naive',)
  config.train.optimizer, config.train.momentum, config.train.weight_decay = 'sgd', 0.0, 0.0
  config.train.clip_norm, config.train.constant_learning_rate = 0.0, True
  config.train.backbone_lr_scale = 0.1
  params = {'backbone': {'w': jnp.ones((2, 3))}, 'cls_head': {'w': jnp.ones(4)}}
  grads = {'backbone': {'w': jnp.full((2, 3), 2.0)}, 'cls_head': {'w': jnp.full(4, 2.0)}}
  tx = optim.make_tx(config, steps_per_epoch=5)
  updates, _ = tx.update(grads, tx.init(params), params)
  lr = config.train.learning_rate  # Plain SGD: update = -rate * gradient, in closed form.
  np.testing.assert_allclose(updates['backbone']['w'], -0.1 * lr * 2.0, rtol=1e-6)
  np.testing.assert_allclose(updates['cls_head']['w'], -lr * 2.0, rtol=1e-6)
