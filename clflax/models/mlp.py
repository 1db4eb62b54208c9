"""The MLP of the classic continual-learning benchmarks (Permuted / Split MNIST)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

_INITS = ('default', 'agem_paper')


class MLPModule(nn.Module):
  """ReLU MLP with `num_heads` output heads of `num_classes` logits each.

  init_scheme='agem_paper' follows the A-GEM authors' code: weights from a
  truncated normal with stddev 0.1, biases 0.1. `head` picks each example's
  head when num_heads > 1 (an int scalar or [B] array).
  """
  hidden: Sequence[int] = (256, 256)
  num_classes: int = 10
  num_heads: int = 1
  init_scheme: str = 'default'

  @nn.compact
  def __call__(self, x, head=None):
    if self.init_scheme == 'agem_paper':
      dense = dict(kernel_init=nn.initializers.truncated_normal(0.1), bias_init=nn.initializers.constant(0.1))
    else:
      dense = {}
    b = x.shape[0]
    x = jnp.asarray(x, jnp.float32).reshape(b, -1)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f'hidden_{i}', **dense)(x))
    logits = nn.Dense(self.num_classes * self.num_heads, name='out', **dense)(x)
    logits = logits.reshape(b, self.num_heads, self.num_classes)
    if self.num_heads == 1:
      return logits[:, 0]
    if head is None:
      raise ValueError(f'MLP has {self.num_heads} heads: pass head= (int or [B] int array)')
    head = jnp.broadcast_to(jnp.asarray(head, jnp.int32), (b,))
    return jnp.take_along_axis(logits, head[:, None, None], axis=1)[:, 0]


def MLP(hidden: Sequence[int] = (256, 256), num_classes: int = 10, num_heads: int = 1,  # pylint: disable=invalid-name
        init: str = 'default') -> MLPModule:
  """Builds an `MLPModule`. A constructor function because a module field named
  `init` would hide `Module.init`."""
  if init not in _INITS:
    raise ValueError(f'unknown init {init!r}; expected one of {_INITS}')
  return MLPModule(tuple(hidden), num_classes, num_heads, init_scheme=init)
