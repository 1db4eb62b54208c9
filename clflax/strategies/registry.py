"""Strategy names -> `Strategy` values (strategies/base.py), in the order their transforms chain.

Chain order of a stage (`build_tx`): si (reads the raw gradient), ewc, mas, l2 (penalty gradients added to the task
gradient), agem | tagem (project the sum against a memory's reference gradient), gem (onto the cone of the earlier
tasks' gradients), then clipping and the base optimizer, then packnet (zeroes the final update of every weight the
current task does not own) or progressive (zeroes it outside the current column). 'naive', 'replay', 'der', 'lwf'
and 'mer' have no transform: they act on the loss or replace the update.

A name of the form 'package.module:ATTRIBUTE' is a strategy defined outside clflax (a `Strategy` value); it goes
after the built-in strategies of its phase, in the order given. Its config section is `config.strategy.<its name>`.
"""
import importlib
import math
import numbers
from typing import Optional

import ml_collections
import optax

from clflax.strategies import agem
from clflax.strategies import base
from clflax.strategies import der
from clflax.strategies import erace
from clflax.strategies import ewc
from clflax.strategies import gem
from clflax.strategies import l2
from clflax.strategies import lwf
from clflax.strategies import mas
from clflax.strategies import mer
from clflax.strategies import packnet
from clflax.strategies import progressive
from clflax.strategies import replay
from clflax.strategies import si
from clflax.strategies import tagem

NAIVE = base.Strategy(name='naive', config=ml_collections.ConfigDict)  # Plain fine-tuning: nothing to add.
BUILT_IN = {s.name: s for s in (  # In chain order.
    NAIVE, si.STRATEGY, ewc.STRATEGY, mas.STRATEGY, l2.STRATEGY, agem.STRATEGY, tagem.STRATEGY, gem.STRATEGY,
    replay.STRATEGY, erace.STRATEGY, der.STRATEGY, lwf.STRATEGY, mer.STRATEGY, packnet.STRATEGY,
    progressive.STRATEGY)}
KNOWN = tuple(BUILT_IN)
# Kept for code written against the registry: the state look-ups live in base.
find_state, replace_state = base.find_state, base.replace_state


def default_config() -> ml_collections.ConfigDict:
  """`config.strategy`: `names` selects the active strategies; one section of fields per built-in strategy."""
  c = ml_collections.ConfigDict()
  c.names = ('naive',)  # Strategy names in any order (chained as above); ('naive',) = plain fine-tuning.
  for strategy in BUILT_IN.values():
    section = strategy.config()
    if section:
      c[strategy.name] = section
  return c


def get(name: str) -> base.Strategy:
  """The strategy of `name`: a built-in one, or 'module:ATTRIBUTE' imported (ValueError in one line otherwise)."""
  if name in BUILT_IN:
    return BUILT_IN[name]
  module_name, colon, attribute = name.partition(':')
  if not colon:
    raise ValueError(f"unknown strategy {name!r}; known: {KNOWN}, or 'module:ATTRIBUTE' for one of your own")
  try:
    value = getattr(importlib.import_module(module_name), attribute)
  except (ImportError, AttributeError) as e:
    raise ValueError(f'strategy {name!r}: cannot import it ({e})') from e
  if not isinstance(value, base.Strategy):
    raise ValueError(f'strategy {name!r} is a {type(value).__name__}, not a clflax.strategies.base.Strategy')
  if value.name in BUILT_IN:
    raise ValueError(f'strategy {name!r} is named {value.name!r}, the name of a built-in strategy')
  return value


def resolve(names) -> tuple[base.Strategy, ...]:
  """The strategies of `names` in chain order."""
  found = [get(n) for n in names]
  rank = {n: i for i, n in enumerate(KNOWN)}
  return tuple(sorted(found, key=lambda s: rank.get(s.name, len(rank))))  # Stable: outside ones keep their order.


def section(strategy_cfg, strategy: base.Strategy):
  """The strategy's config section (its defaults when it has no fields and none was given)."""
  if strategy.name in strategy_cfg:
    return strategy_cfg[strategy.name]
  defaults = strategy.config()
  if defaults:
    raise ValueError(f'strategy {strategy.name!r} needs a strategy.{strategy.name} section (e.g. its config())')
  return defaults


def validate(strategy_cfg, config: Optional[ml_collections.ConfigDict] = None) -> tuple:
  """Checks the names and the active strategies' fields (and, given the whole `config`, the rules that depend on
  the run); returns the names. Raises a one-line ValueError naming the bad name, field or value."""
  names = strategy_cfg.get('names') if hasattr(strategy_cfg, 'get') else None
  if isinstance(names, str) or not isinstance(names, (tuple, list)):
    raise ValueError(f'strategy.names must be a tuple of names from {KNOWN}, got {names!r}')
  if not names:
    raise ValueError("strategy.names is empty: use ('naive',) for no strategy")
  if len(set(names)) != len(names):
    raise ValueError(f'strategy.names has duplicates: {tuple(names)}')
  strategies = resolve(names)
  for part in ('task_loss', 'replace_update'):
    owners = [s.name for s in strategies if getattr(s, part) is not None]
    if len(owners) > 1:
      raise ValueError(f'strategies {" and ".join(owners)} both replace the {part.replace("_", " ")}: pick one')
  for strategy in strategies:
    if strategy.phase not in base.PHASES:
      raise ValueError(f'strategy {strategy.name!r}: phase must be one of {base.PHASES}, got {strategy.phase!r}')
    if strategy.validate is not None:
      strategy.validate(section(strategy_cfg, strategy), tuple(names), config)
  return tuple(names)


def needs(strategy_cfg) -> base.Needs:
  """What the active strategies ask the trainer to keep (the union of their `Needs`)."""
  return base.merge_needs(base.needs_of(s, section(strategy_cfg, s)) for s in resolve(strategy_cfg['names']))


def build_tx(strategy_cfg, base_tx: optax.GradientTransformation, clip_norm: Optional[float] = None,
             example=None, stage: Optional[int] = None, task: str = '') -> optax.GradientTransformationExtraArgs:
  """optax.chain(gradient-phase transforms, [clip_by_global_norm], base_tx, update-phase transforms) of the active
  strategies for stage `stage` (head `task`). `example` (one training example without batch axis) shapes memories
  kept in the optax state (tagem). Every extra argument of `update` goes to every part (`ref_grads=`, ...)."""
  strategies = resolve(validate(strategy_cfg))
  if any(s.stage_program for s in strategies) and stage is None:
    raise ValueError(f'{", ".join(s.name for s in strategies if s.stage_program)} needs build_tx(..., stage=the '
                     'stage index): its transform differs per stage')
  info = base.Stage(index=stage if stage is not None else 0, task=task, example=example)
  parts = {phase: [s.transform(section(strategy_cfg, s), info) for s in strategies
                   if s.transform is not None and s.phase == phase] for phase in base.PHASES}
  clip = []
  if clip_norm is not None:
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, numbers.Real) \
        or not clip_norm > 0 or not math.isfinite(clip_norm):
      raise ValueError(f'clip_norm must be a finite number > 0, got {clip_norm!r}')
    clip = [optax.clip_by_global_norm(clip_norm)]
  return optax.chain(*parts['gradient'], *clip, base_tx, *parts['update'])


def base_position(strategy_cfg, clipped: bool = False) -> int:
  """Index of the base optimizer's state in the chain's state tuple (the strategies' states are all the others)."""
  strategies = resolve(strategy_cfg['names'])
  return sum(s.transform is not None and s.phase == 'gradient' for s in strategies) + int(clipped)
