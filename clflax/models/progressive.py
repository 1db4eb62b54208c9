"""Progressive Neural Networks (Rusu et al. 2016).

One column (a whole network) per task. Column k's layer i also receives the
layer i-1 activations of every earlier column through a lateral adapter:
  h_i^(k) = f(W_i^(k) h_{i-1}^(k) + U_i^(k) relu(V_i^(k) (a_i^(k) * [h_{i-1}^(<k)])))
with a learned scalar a (initialised small and random) and V projecting the
concatenated earlier activations back to one column's width, as in the
paper's non-linear adapters (so the adapter size does not grow with k).

Training column k, earlier columns are frozen: their activations enter
column k through `stop_gradient` (no wasted backward pass) and
`trainable_mask` selects column k's parameters for the optimizer. Earlier
columns' outputs are therefore untouched: no forgetting by construction, at
the cost of parameters growing with the number of tasks.

`model.init(key, x, column=num_columns - 1)` creates every column;
`model.apply(variables, x, column=k)` runs columns 0..k and returns column k's
logits.
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

PyTree = Any


def _column_name(k: int) -> str:
  return f'column_{k}'


def _check_column(column, num_columns: int) -> None:
  if isinstance(column, bool) or not isinstance(column, int) \
      or not 0 <= column < num_columns:
    raise ValueError(f'column must be an int in [0, {num_columns}), got '
                     f'{column!r}')


class Adapter(nn.Module):
  """Lateral adapter: scalar gate, projection to one column's width, ReLU, then
  `project` (a Dense for vectors, a strided conv for feature maps)."""
  features: int
  kernel: Sequence[int] | None = None  # None: Dense; else conv kernel size.
  strides: Sequence[int] | None = None

  @nn.compact
  def __call__(self, earlier):
    h = jnp.concatenate(earlier, axis=-1)
    alpha = self.param('alpha', nn.initializers.uniform(0.1), ())
    h = nn.relu(nn.Dense(earlier[0].shape[-1], name='reduce')(alpha * h))
    if self.kernel is None:
      return nn.Dense(self.features, use_bias=False, name='project')(h)
    return nn.Conv(self.features, tuple(self.kernel), strides=self.strides,
                   use_bias=False, name='project')(h)


class _MLPColumn(nn.Module):
  hidden: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x, earlier):
    """earlier: per earlier column, its list of hidden activations."""
    acts, h = [], x
    for i, width in enumerate(self.hidden):
      z = nn.Dense(width, name=f'hidden_{i}')(h)
      if earlier and i > 0:
        z = z + Adapter(width, name=f'adapter_{i}')([a[i - 1] for a in earlier])
      h = nn.relu(z)
      acts.append(h)
    out = nn.Dense(self.num_classes, name='out')(h)
    if earlier and self.hidden:
      out = out + Adapter(self.num_classes, name='adapter_out')(
          [a[-1] for a in earlier])
    return out, acts


class ProgressiveMLP(nn.Module):
  """Progressive ReLU MLP: `num_columns` columns of `hidden` widths each.

  Inputs [B, ...] are flattened (like `models.mlp.MLP`); no lateral enters
  the first hidden layer (every column sees the same input).
  """
  hidden: Sequence[int] = (256, 256)
  num_classes: int = 10
  num_columns: int = 2

  @nn.compact
  def __call__(self, x, column: int):
    _check_column(column, self.num_columns)
    x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
    earlier = []
    for k in range(column + 1):
      out, acts = _MLPColumn(tuple(self.hidden), self.num_classes,
                             name=_column_name(k))(x, earlier)
      earlier.append([jax.lax.stop_gradient(a) for a in acts])
    return out


class _ConvColumn(nn.Module):
  features: Sequence[int]
  num_classes: int
  kernel: int
  strides: int

  @nn.compact
  def __call__(self, x, earlier):
    k, s = (self.kernel, self.kernel), (self.strides, self.strides)
    acts, h = [], x
    for i, width in enumerate(self.features):
      z = nn.Conv(width, k, strides=s, name=f'conv_{i}')(h)
      if earlier and i > 0:
        z = z + Adapter(width, k, s, name=f'adapter_{i}')(
            [a[i - 1] for a in earlier])
      h = nn.relu(z)
      acts.append(h)
    pooled = jnp.mean(h, axis=(1, 2))
    out = nn.Dense(self.num_classes, name='out')(pooled)
    if earlier and self.features:
      out = out + Adapter(self.num_classes, name='adapter_out')(
          [jnp.mean(a[-1], axis=(1, 2)) for a in earlier])
    return out, acts


class ProgressiveConvNet(nn.Module):
  """Progressive small conv net: per column, strided 3x3 conv + ReLU layers,
  global average pooling and a linear classifier. Inputs [B, H, W, C].

  Laterals of conv layer i are strided convolutions of the earlier columns'
  layer i-1 maps (same kernel and stride as the layer, so shapes agree).
  """
  features: Sequence[int] = (16, 32)
  num_classes: int = 10
  num_columns: int = 2
  kernel: int = 3
  strides: int = 2

  @nn.compact
  def __call__(self, x, column: int):
    _check_column(column, self.num_columns)
    if x.ndim != 4:
      raise ValueError(f'ProgressiveConvNet expects [B, H, W, C] inputs, got '
                       f'shape {x.shape}')
    x = jnp.asarray(x, jnp.float32)
    earlier = []
    for k in range(column + 1):
      out, acts = _ConvColumn(tuple(self.features), self.num_classes,
                              self.kernel, self.strides,
                              name=_column_name(k))(x, earlier)
      earlier.append([jax.lax.stop_gradient(a) for a in acts])
    return out


def trainable_mask(params: PyTree, column: int) -> PyTree:
  """Bool per leaf: True for column `column`'s parameters, False otherwise.

  Accepts params or a whole variables dict. Freeze the rest with
  `optax.chain(tx, optax.masked(optax.set_to_zero(), frozen_mask(params, k)))`
  (`freeze_others` does exactly that); note that `optax.masked(tx, mask)`
  alone would pass the frozen leaves' raw gradients through.
  """
  if isinstance(column, bool) or not isinstance(column, int) or column < 0:
    raise ValueError(f'column must be an int >= 0, got {column!r}')
  name = _column_name(column)

  def in_column(path, _):
    return any(getattr(p, 'key', None) == name for p in path)
  mask = jax.tree_util.tree_map_with_path(in_column, params)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f'no parameters under {name!r}: is column < num_columns '
                     'and were all columns initialised?')
  return mask


def frozen_mask(params: PyTree, column: int) -> PyTree:
  """Complement of `trainable_mask`: True where updates must be zero."""
  return jax.tree.map(operator.not_, trainable_mask(params, column))


def freeze_others(tx: optax.GradientTransformation, params: PyTree,
                  column: int) -> optax.GradientTransformation:
  """tx for column `column` only: every other column's update is zero.

  The zeroing comes after tx, so weight decay or momentum cannot move a
  frozen column either.
  """
  return optax.chain(tx, optax.masked(optax.set_to_zero(),
                                      frozen_mask(params, column)))


def _leaf_column(path) -> int:
  """Column number of a parameter from its path ('column_<k>'), -1 outside every column."""
  for entry in path:
    key = getattr(entry, 'key', None)
    if isinstance(key, str) and key.startswith('column_'):
      return int(key[len('column_'):])
  return -1


def train_column_only(column: int) -> optax.GradientTransformationExtraArgs:
  """Zeroes the update of every parameter outside column `column` (parameters outside all columns pass).

  The column is a Python int, fixed when the stage's step is compiled (one program per column): the other columns'
  updates are then constant zeros, which XLA folds away together with their gradients and parameter additions, so
  a step costs one column's backward and update. (With the column a traced value in the optax state, every step
  computed and wrote all columns' updates: all 22M parameters of the 17-column Permuted-MNIST network.) Put it
  LAST in the chain.
  """
  if isinstance(column, bool) or not isinstance(column, int) or column < 0:
    raise ValueError(f'column must be an int >= 0, got {column!r}')

  def update_fn(updates, state, params=None, **extra):
    del params, extra

    def one(path, u):
      owner = _leaf_column(path)
      return u if owner in (-1, column) else jnp.zeros_like(u)

    return jax.tree_util.tree_map_with_path(one, updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)
