"""A strategy defined outside clflax, as a user would write one in their own project: L2 Init (Kumar, Marklund and
Van Roy 2023, "Maintaining Plasticity in Continual Learning via Regenerative Regularization"), a pull of every
parameter towards its value at the start of the run. Run it with `config.strategy.names = ('user_strategy:L2_INIT',)`
and `config.strategy.l2init = user_strategy.L2_INIT.config()`."""
from typing import Any, NamedTuple

import jax
import ml_collections
import optax

from clflax.strategies import base


class L2InitState(NamedTuple):
  initial: Any  # The parameters the run started from.


def l2_init(strength: float) -> optax.GradientTransformation:
  """Adds strength * (params - initial params) to the updates (the gradient of 0.5 * strength * ||theta - theta_0||^2)."""

  def update_fn(updates, state, params=None, **extra):
    del extra
    return jax.tree.map(lambda u, p, p0: u + strength * (p - p0), updates, params, state.initial), state

  return optax.GradientTransformationExtraArgs(L2InitState, update_fn)


def _config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.strength = 0.01  # Pull towards the initial parameters.
  return c


L2_INIT = base.Strategy(
    name='l2init', config=_config,
    validate=lambda cfg, names, config=None: base.check_fields('l2init', cfg, {'strength': {}}),
    transform=lambda cfg, stage: l2_init(cfg.strength))
