"""The Strategy interface: a continual-learning strategy is a value, a NamedTuple of optional pure functions.

The trainer knows no strategy by name. It calls, for each strategy of `config.strategy.names` (chain order fixed
by the registry), the parts a strategy fills in and skips the ones it leaves at None:

  config()                          its config section (`config.strategy.<name>`), every field commented
  validate(cfg, names, config)      one-line ValueError for a bad field or combination (`names`: the active
                                    strategies), before anything runs; `config` (the whole run) or None
  needs(cfg) -> Needs               what the trainer keeps for it: episodic memories (with the model's outputs),
                                    examples of each finished task, the previous model (a teacher)
  transform(cfg, stage) -> tx       its optax transform for one stage (`Stage`): penalties and projections go
                                    before clipping and the base optimizer (phase 'gradient'), masks after it
                                    (phase 'update'); its state lives in the optax state and survives stages
  task_loss(cfg, ctx, params, key)  replaces the head's own loss on the incoming batch (e.g. ER-ACE)
  loss_terms(cfg, ctx, params, key) -> {name: scalar} added to the loss inside the compiled step
  update_args(cfg, ctx, params, key) -> {kwarg: value} for `tx.update` (A-GEM's `ref_grads=`, GEM's
                                    `task_grads=`), computed inside the compiled step
  replace_update(cfg, ctx, params, key) -> (params, metrics)   a whole update of its own (MER)
  start_stage(cfg, state, stage) -> state                      before a stage trains (PackNet's ownership)
  finish_training(cfg, state, stage) -> (state, extra_epochs)  after its epochs, before evaluation (PackNet's
                                    pruning; the trainer then runs `extra_epochs` more of the same stage)
  end_stage(cfg, state, end: EndOfStage) -> state              consolidation after a stage (Fisher, importance,
                                    anchors), with a sample of the finished task and per-example functions
  eval_params(cfg, params, opt_state, stage) -> params         the parameters a task is evaluated with
  model(cfg, config, model) -> model                           a model of its own (Progressive Networks)

`cfg` is the strategy's own config section; `ctx` a `StepContext` (what the compiled step knows: the batch, the
head, the earlier heads, the memories, the teacher, the strategies' states and the forward functions). Every
function must be pure and jittable where it runs inside the step. See docs/design.md for a worked example.
"""
import math
import numbers
import zlib
from typing import Any, Callable, NamedTuple, Optional, Type, TypeVar

import jax
import ml_collections

PyTree = Any
S = TypeVar('S')
PHASES = ('gradient', 'update')


class Needs(NamedTuple):
  """What a strategy asks the trainer to keep for it (the largest request of the active strategies wins)."""
  memory_per_task: int = 0  # Episodic memory: examples kept of each finished task (0: none).
  memory_outputs: bool = False  # Store the model's outputs on each memory example at the end of its stage (DER).
  examples: int = 0  # Examples of the finished task handed to `end_stage` (EWC's Fisher, MAS's importance).
  teacher: bool = False  # Keep the model of the previous stage (LwF).


class Stage(NamedTuple):
  """What a transform may depend on: the stage it trains and the shape of one training example."""
  index: int  # 0-based stage index.
  task: str  # The head trained in this stage.
  example: Any = None  # One training example without batch axis (numpy), to shape memories kept in the state.


class StepContext(NamedTuple):
  """What the compiled train step knows, for `task_loss`, `loss_terms`, `update_args` and `replace_update`."""
  task: str  # Head trained by this step (static).
  earlier: tuple  # Heads of the stages before this one, in order (static).
  batch: dict  # The incoming batch (`valid` marks real rows).
  outputs: Any  # The model's outputs on `batch` in this step's forward pass (before the update).
  memories: dict  # Episodic memories (see strategies/memory.py for their layouts).
  teacher: Any  # The previous stage's {'params', 'batch_stats'} when a strategy needs it, else {}.
  opt_state: Any  # The optax state before this update (strategies find their own state in it).
  config: ml_collections.ConfigDict  # The whole run config.
  # apply(params, batch, head, key) -> outputs: head `head` in training mode (dropout from `key`), the step's
  # batch statistics; apply_frozen(variables, batch, head) -> outputs: inference mode, other weights (a teacher).
  apply: Callable
  apply_frozen: Callable
  # loss(head, outputs, batch) -> (scalar, parts): that head's own loss, padding rows excluded.
  loss: Callable
  # distill(head, outputs, teacher_outputs, temperature) -> scalar: keeping a head's answers (LwF), per task kind.
  distill: Callable


class EndOfStage(NamedTuple):
  """What `end_stage` gets after stage `stage` (head `task`) has trained and been evaluated."""
  stage: int
  task: str
  examples: dict  # `Needs.examples` training examples of the task (un-augmented, leading axis N, `valid` set).
  example_loss: Callable  # example_loss(params, example) -> scalar: the task's loss on ONE example.
  example_outputs: Callable  # example_outputs(params, example) -> outputs on ONE example (batch norm frozen).


class Strategy(NamedTuple):
  """A continual-learning strategy; every part but `name` and `config` is optional (see the module doc)."""
  name: str
  config: Callable[[], ml_collections.ConfigDict]
  validate: Optional[Callable] = None
  needs: Optional[Callable] = None
  transform: Optional[Callable] = None
  phase: str = 'gradient'  # Where `transform` sits: before clipping + the base optimizer, or after ('update').
  stage_program: bool = False  # The transform differs per stage (one compiled program per stage, not per head).
  task_loss: Optional[Callable] = None
  loss_terms: Optional[Callable] = None
  update_args: Optional[Callable] = None
  replace_update: Optional[Callable] = None
  start_stage: Optional[Callable] = None
  finish_training: Optional[Callable] = None
  end_stage: Optional[Callable] = None
  eval_params: Optional[Callable] = None
  model: Optional[Callable] = None


def needs_of(strategy: Strategy, cfg) -> Needs:
  return strategy.needs(cfg) if strategy.needs is not None else Needs()


def merge_needs(needs) -> Needs:
  """The union of several strategies' needs: the largest memory and sample, outputs or teacher if any asks."""
  needs = list(needs)
  return Needs(memory_per_task=max([0] + [n.memory_per_task for n in needs]),
               memory_outputs=any(n.memory_outputs for n in needs),
               examples=max([0] + [n.examples for n in needs]),
               teacher=any(n.teacher for n in needs))


def key_for(key: jax.Array, name: str) -> jax.Array:
  """A strategy's own random key for this step: one stream per name, so adding a strategy to a chain leaves the
  others' draws as they were."""
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def check_number(name: str, field: str, value, *, positive: bool = False, integer: bool = False,
                 upper: Optional[float] = None, below: Optional[float] = None) -> None:
  """ValueError naming `strategy.<name>.<field>` unless value is a finite (int) number >= 0 (> 0, <= upper,
  < below)."""
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, kind):
    raise ValueError(f'strategy.{name}.{field} must be {"an int" if integer else "a number"}, got {value!r}')
  if not math.isfinite(value) or value < 0 or (positive and value == 0):
    raise ValueError(f'strategy.{name}.{field} must be {"> 0" if positive else ">= 0"}, got {value!r}')
  if upper is not None and value > upper:
    raise ValueError(f'strategy.{name}.{field} must be <= {upper}, got {value!r}')
  if below is not None and not value < below:
    raise ValueError(f'strategy.{name}.{field} must be < {below}, got {value!r}')


def check_fields(name: str, cfg, rules: dict) -> None:
  """Every field of `rules` present in `cfg` and valid: rules map a field to check_number's keyword arguments, or
  to a tuple of allowed values."""
  for field, rule in rules.items():
    if field not in cfg:
      raise ValueError(f'strategy.{name}.{field} is missing')
    if isinstance(rule, tuple):
      if cfg[field] not in rule:
        raise ValueError(f'strategy.{name}.{field} must be one of {rule}, got {cfg[field]!r}')
    else:
      check_number(name, field, cfg[field], **rule)


def require_classic(name: str, config, why: str) -> None:
  """Refuses a strategy that only makes sense on the classic MNIST protocols (the MLP)."""
  if config.model.backbone != 'mlp':
    raise ValueError(f'invalid config: strategy {name}: the classic protocols only ({why})')


def require_alone(name: str, names, why: str) -> None:
  """Refuses a strategy combined with any other ('naive' aside)."""
  if set(names) - {name, 'naive'}:
    raise ValueError(f'strategy {name} combines with no other strategy ({why}), got {tuple(names)}')


def find_state(opt_state: Any, state_type: Type[S]) -> Optional[S]:
  """The unique state of type `state_type` nested in opt_state, or None; ValueError if there are several."""
  is_state = lambda x: isinstance(x, state_type)  # noqa: E731
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
  if len(found) > 1:
    raise ValueError(f'{len(found)} states of type {state_type.__name__} in opt_state; expected at most one')
  return found[0] if found else None


def replace_state(opt_state: Any, state_type: Type[S], fn: Callable[[S], S]) -> Any:
  """opt_state with fn applied to its unique `state_type` state, e.g.
  `replace_state(opt_state, EwcState, lambda s: ewc.consolidate(s, params, fisher))`; ValueError if there is none."""
  if find_state(opt_state, state_type) is None:
    raise ValueError(f'no {state_type.__name__} in opt_state (is the strategy in strategy.names?)')
  is_state = lambda x: isinstance(x, state_type)  # noqa: E731
  return jax.tree.map(lambda x: fn(x) if is_state(x) else x, opt_state, is_leaf=is_state)
