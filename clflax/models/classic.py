"""The classic protocols' models: the benchmarks' MLP with the trainer's calling convention (`task` picks nothing:
every task shares one head, or heads come per example), and its Progressive Network (a column per stage)."""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from clflax.models import mlp
from clflax.models import progressive


class ClassicNet(nn.Module):
  """The benchmarks' MLP with the trainer's calling convention (`task` is ignored: heads come per example)."""
  hidden: Sequence[int] = (256, 256)
  num_classes: int = 10
  num_heads: int = 1
  init_scheme: str = 'default'
  dtype: Any = jnp.float32  # Computation dtype (see MultiTaskNet.dtype).

  @nn.compact
  def __call__(self, images, task=None, train=False, head=None):
    del task, train
    net = mlp.MLPModule(tuple(self.hidden), self.num_classes, self.num_heads, self.init_scheme, name='mlp')
    return net(jnp.asarray(images).astype(self.dtype), head=head if self.num_heads > 1 else None)


class ProgressiveClassicNet(nn.Module):
  """A Progressive Network of the benchmarks' MLP, one column per stage: head `task` runs columns 0..its stage and
  returns its column's logits (the task is needed at test time). Without `task` (init) every column is built."""
  task_names: Sequence[str]
  hidden: Sequence[int] = (256, 256)
  num_classes: int = 10
  dtype: Any = jnp.float32  # Computation dtype (see MultiTaskNet.dtype).

  @nn.compact
  def __call__(self, images, task=None, train=False, head=None):
    del train, head  # Every column has its own output layer.
    columns = len(self.task_names)
    column = columns - 1 if task is None else self.task_names.index(task)
    return progressive.ProgressiveMLP(tuple(self.hidden), self.num_classes, columns, name='progressive')(
        jnp.asarray(images).astype(self.dtype), column=column)


def build_model(config) -> nn.Module:
  """The MLP of `config.classic` (one shared head, or one per task when `multi_head`)."""
  c = config.classic
  num_heads = c.num_tasks if c.multi_head else 1
  return ClassicNet(tuple(config.model.hidden), num_classes(config), num_heads, config.model.init,
                    jnp.dtype(config.model.dtype))


def num_classes(config) -> int:
  """Output classes: 2 per head for task-incremental Split MNIST, else the 10 digits."""
  c = config.classic
  return c.classes_per_task if (c.protocol == 'split' and c.multi_head) else 10
