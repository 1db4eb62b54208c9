"""Strategy names -> one optax chain, config validation and state look-up.

Chain order (`build_tx`): si (needs the raw gradient), ewc, mas, l2 (penalty
gradients added to the task gradient), agem (projects the sum against the
memory's reference gradient; tagem the same with its own online clustering
memory, kept in its optax state), gem (projects it onto the cone of the earlier
tasks' gradients), clip_by_global_norm, base optimizer, packnet (zeroes the
final update of every weight the current task does not own) or progressive
(zeroes it outside the current task's column; the model becomes a
Progressive Network, `models/progressive.py`).
'naive', 'replay', 'lwf' and 'der' add no transform: they act on the data /
loss and the trainer handles them. 'mer' replaces the whole update (its own inner SGD and Reptile steps).
"""
import math
import numbers
from typing import Any, Callable, Optional, Type, TypeVar

import jax
import ml_collections
import optax

from clflax.models import progressive as progressive_lib
from clflax.strategies import agem as agem_lib
from clflax.strategies import ewc as ewc_lib
from clflax.strategies import gem as gem_lib
from clflax.strategies import l2 as l2_lib
from clflax.strategies import mas as mas_lib
from clflax.strategies import packnet as packnet_lib
from clflax.strategies import si as si_lib
from clflax.strategies import tagem as tagem_lib

KNOWN = ('naive', 'ewc', 'agem', 'replay', 'lwf', 'si', 'mas', 'l2', 'gem', 'der', 'tagem', 'packnet', 'mer',
         'progressive')
MEMORY_STRATEGIES = ('agem', 'replay', 'gem', 'der', 'mer')  # Keep an episodic memory of each task (`memory_per_task`).
FISHER_MODES = ('exact', 'running')
# Strategy states that carry what earlier stages consolidated; a new stage's fresh optimizer state keeps them.
CONSOLIDATED_STATES = (ewc_lib.EwcState, ewc_lib.RunningFisherState, mas_lib.MasState, si_lib.SiState,
                       l2_lib.L2State, tagem_lib.TagemState, packnet_lib.PackNetState)

S = TypeVar('S')


def default_config() -> ml_collections.ConfigDict:
  """Every strategy's fields; `names` selects which are active."""
  c = ml_collections.ConfigDict()
  c.names = ('agem',)  # Tuple of KNOWN names, combined freely; ('naive',) = plain.

  c.ewc = ml_collections.ConfigDict()
  c.ewc.strength = 100.  # lambda: penalty 0.5 * lambda * sum F (theta - theta*)^2.
  c.ewc.decay = 1.0  # Online EWC: F = decay * F_old + F_new (0 keeps the newest).
  c.ewc.fisher = 'exact'  # 'exact' per-example Fisher, or 'running' (A-GEM authors').
  c.ewc.fisher_samples = 64  # Examples of the finished task for the exact Fisher.

  c.agem = ml_collections.ConfigDict()
  c.agem.memory_per_task = 64  # Episodic memory size kept per finished task.
  c.agem.ref_batch = 16  # Memory examples per task for the reference gradient.

  c.replay = ml_collections.ConfigDict()
  c.replay.memory_per_task = 64  # Reservoir capacity per finished task.
  c.replay.batch = 8  # Memory examples replayed per step (per old task).
  c.replay.weight = 1.0  # Weight of the replayed loss relative to the task loss.

  c.lwf = ml_collections.ConfigDict()
  c.lwf.temperature = 2.0  # Distillation temperature T (loss scaled by T^2).
  c.lwf.weight = 1.0  # Weight of the distillation loss of the old heads.

  c.si = ml_collections.ConfigDict()
  c.si.strength = 0.1  # Penalty strength (2c in Zenke et al.'s notation).
  c.si.damping = 0.1  # xi in Omega = omega / (delta^2 + xi).
  c.si.max_stiffness = 0.0  # Cap on strength * Omega per parameter (0: none); 1/lr keeps plain SGD stable.

  c.mas = ml_collections.ConfigDict()
  c.mas.strength = 1.0  # lambda of the MAS penalty.
  c.mas.samples = 64  # Examples of the finished task for the importance.

  c.l2 = ml_collections.ConfigDict()
  c.l2.strength = 0.01  # Uniform pull towards the previous task's weights.

  c.gem = ml_collections.ConfigDict()
  c.gem.memory_per_task = 64  # Episodic memory size kept per finished task.
  c.gem.ref_batch_per_task = 16  # Memory examples of EACH earlier task for its gradient, every step.
  c.gem.margin = 0.5  # gamma: dual lower bound when a constraint is violated (GEM authors' MNIST value; 0 = exact).

  c.der = ml_collections.ConfigDict()
  c.der.memory_per_task = 64  # Examples (with the model's logits at the end of their stage) kept per task.
  c.der.batch = 8  # Memory examples per step for each replay term (per old task with per-task memories).
  c.der.alpha = 0.3  # Weight of the MSE between current and stored logits (DER's distillation term).
  c.der.beta = 0.0  # Weight of the memory labels' task loss: 0 = DER, > 0 = DER++.

  c.tagem = ml_collections.ConfigDict()  # Task-agnostic A-GEM (Lamers et al. 2023); one class label per example.
  c.tagem.pools = 10  # One pool per class label (labels outside [0, pools) are never stored).
  c.tagem.clusters = 4  # Q: clusters per pool.
  c.tagem.per_cluster = 4  # P: samples per cluster (the oldest leaves first).
  c.tagem.ref_batch = 16  # Memory examples (from all pools) for the reference gradient.

  c.packnet = ml_collections.ConfigDict()  # PackNet (Mallya & Lazebnik 2018); task-specific weights at inference.
  c.packnet.prune_fraction = 0.75  # Fraction of each task's weights per layer freed for later tasks after its stage.
  c.packnet.retrain_epochs = 1  # Epochs of retraining the kept weights after pruning.

  c.mer = ml_collections.ConfigDict()  # Meta-Experience Replay (Riemer et al. 2019), Reptile form; its own update.
  c.mer.memory_per_task = 64  # Episodic memory kept per finished task.
  c.mer.batches = 5  # s: Reptile batches per incoming batch.
  c.mer.steps = 2  # k: SGD steps per Reptile batch: the incoming batch, then k - 1 memory batches of its size.
  c.mer.beta = 0.1  # Within-batch Reptile rate (1 = plain SGD through the batch).
  c.mer.gamma = 1.0  # Across-batch Reptile rate.
  return c


def examples_per_task(strategy_cfg) -> int:
  """Examples any strategy may ask of a finished task (memories, EWC's Fisher / MAS's samples), active or not."""
  wants = [strategy_cfg.get(name, {}).get('memory_per_task', 0) for name in MEMORY_STRATEGIES]
  wants += [strategy_cfg.get('ewc', {}).get('fisher_samples', 0), strategy_cfg.get('mas', {}).get('samples', 0)]
  return max([1, *wants])


def _number(name: str, field: str, value, *, positive: bool = False,
            integer: bool = False, upper: Optional[float] = None) -> None:
  """ValueError unless value is a finite (int) number >= 0 (> 0, <= upper)."""
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, kind):
    want = 'an int' if integer else 'a number'
    raise ValueError(f'strategy.{name}.{field} must be {want}, got {value!r}')
  if not math.isfinite(value) or value < 0 or (positive and value == 0):
    bound = '> 0' if positive else '>= 0'
    raise ValueError(f'strategy.{name}.{field} must be {bound}, got {value!r}')
  if upper is not None and value > upper:
    raise ValueError(f'strategy.{name}.{field} must be <= {upper}, got {value!r}')


# Per strategy: field -> keyword arguments of _number (None = checked apart).
_FIELDS = {
    'ewc': {'strength': {}, 'decay': {'upper': 1.0}, 'fisher': None,
            'fisher_samples': {'positive': True, 'integer': True}},
    'agem': {'memory_per_task': {'positive': True, 'integer': True},
             'ref_batch': {'positive': True, 'integer': True}},
    'replay': {'memory_per_task': {'positive': True, 'integer': True},
               'batch': {'positive': True, 'integer': True},
               'weight': {}},
    'lwf': {'temperature': {'positive': True}, 'weight': {}},
    'si': {'strength': {}, 'damping': {'positive': True}, 'max_stiffness': {}},
    'mas': {'strength': {}, 'samples': {'positive': True, 'integer': True}},
    'l2': {'strength': {}},
    'gem': {'memory_per_task': {'positive': True, 'integer': True},
            'ref_batch_per_task': {'positive': True, 'integer': True},
            'margin': {}},
    'der': {'memory_per_task': {'positive': True, 'integer': True},
            'batch': {'positive': True, 'integer': True},
            'alpha': {}, 'beta': {}},
    'tagem': {'pools': {'positive': True, 'integer': True}, 'clusters': {'positive': True, 'integer': True},
              'per_cluster': {'positive': True, 'integer': True}, 'ref_batch': {'positive': True, 'integer': True}},
    'packnet': {'prune_fraction': {}, 'retrain_epochs': {'integer': True}},
    'mer': {'memory_per_task': {'positive': True, 'integer': True}, 'batches': {'positive': True, 'integer': True},
            'steps': {'positive': True, 'integer': True}, 'beta': {'positive': True}, 'gamma': {'positive': True}},
}


def validate(strategy_cfg) -> tuple:
  """Checks names and the active strategies' fields; returns the names.

  Raises a one-line ValueError naming the bad name, field or value.
  """
  names = strategy_cfg.get('names') if hasattr(strategy_cfg, 'get') else None
  if isinstance(names, str) or not isinstance(names, (tuple, list)):
    raise ValueError(f'strategy.names must be a tuple of names from {KNOWN}, '
                     f'got {names!r}')
  if not names:
    raise ValueError("strategy.names is empty: use ('naive',) for no strategy")
  for name in names:
    if name not in KNOWN:
      raise ValueError(f'unknown strategy {name!r}; known: {KNOWN}')
  if len(set(names)) != len(names):
    raise ValueError(f'strategy.names has duplicates: {tuple(names)}')
  for alone in ('mer', 'progressive'):
    if alone in names and set(names) - {alone, 'naive'}:
      raise ValueError(f'strategy {alone} combines with no other strategy (mer replaces the optimizer step, '
                       f'progressive the model), got {tuple(names)}')
  if {'agem', 'tagem'} <= set(names):
    raise ValueError('strategy.names has both agem and tagem: TA-A-GEM is A-GEM with its own memory, pick one')
  for name in names:
    fields = _FIELDS.get(name, {})
    if fields and name not in strategy_cfg:
      raise ValueError(f'strategy {name!r} needs a strategy.{name} section')
    for field, rule in fields.items():
      if field not in strategy_cfg[name]:
        raise ValueError(f'strategy.{name}.{field} is missing')
      value = strategy_cfg[name][field]
      if rule is not None:
        _number(name, field, value, **rule)
      elif value not in FISHER_MODES:
        raise ValueError(f'strategy.ewc.fisher must be one of {FISHER_MODES}, '
                         f'got {value!r}')
  if 'packnet' in names and not strategy_cfg['packnet']['prune_fraction'] < 1:
    raise ValueError('strategy.packnet.prune_fraction must be < 1 (the task keeps the rest), got '
                     f"{strategy_cfg['packnet']['prune_fraction']!r}")
  return tuple(names)


def build_tx(strategy_cfg, base_tx: optax.GradientTransformation,
             clip_norm: Optional[float] = None, example: Any = None,
             stage: Optional[int] = None) -> optax.GradientTransformationExtraArgs:
  """optax.chain(si, ewc, mas, l2, agem | tagem, gem, clip, base_tx, packnet) for the active names.

  The result accepts `ref_grads=` (A-GEM, TA-A-GEM), `memory_batch=` (TA-A-GEM) and `task_grads=`, `task_valid=`
  (GEM) in update whether or not those strategies are active. `example` (one training example without batch axis)
  shapes TA-A-GEM's memory; `stage` (the index of the stage the chain trains) is the column progressive trains.
  """
  names = validate(strategy_cfg)
  cfg = strategy_cfg  # ConfigDict or plain nested dict: item access only.
  parts = []
  if 'si' in names:
    parts.append(si_lib.si(cfg['si']['strength'], cfg['si']['damping'], cfg['si']['max_stiffness']))
  if 'ewc' in names:
    if cfg['ewc'].get('fisher', 'exact') == 'running':  # The A-GEM authors' estimator, from raw gradients.
      parts.insert(0, ewc_lib.running_fisher_tracker())
    parts.append(ewc_lib.ewc(cfg['ewc']['strength']))
  if 'mas' in names:
    parts.append(mas_lib.mas(cfg['mas']['strength']))
  if 'l2' in names:
    parts.append(l2_lib.l2(cfg['l2']['strength']))
  if 'agem' in names:
    parts.append(agem_lib.agem())
  if 'tagem' in names:
    if example is None:
      raise ValueError('tagem needs build_tx(..., example=one training example) to shape its memory')
    t = cfg['tagem']
    parts.append(tagem_lib.tagem(t['pools'], t['clusters'], t['per_cluster'], example))
  if 'gem' in names:  # Where A-GEM sits: it constrains the full update, penalties included.
    parts.append(gem_lib.gem(cfg['gem']['margin']))
  if clip_norm is not None:
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, numbers.Real) \
        or not clip_norm > 0 or not math.isfinite(clip_norm):
      raise ValueError(f'clip_norm must be a finite number > 0, got {clip_norm!r}')
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(base_tx)
  if 'packnet' in names:  # Last: momentum or weight decay must not move a frozen weight either.
    parts.append(packnet_lib.packnet())
  if 'progressive' in names:  # Likewise last; a static column, so a step costs one column (one tx per stage).
    if stage is None:
      raise ValueError('progressive needs build_tx(..., stage=the stage index): it trains that column only')
    parts.append(progressive_lib.train_column_only(stage))
  return optax.chain(*parts)


def _matches(state_type: Type) -> Callable[[Any], bool]:
  return lambda x: isinstance(x, state_type)


def find_state(opt_state: Any, state_type: Type[S]) -> Optional[S]:
  """The unique state of type `state_type` nested in opt_state, or None.

  Raises ValueError if there are several (ambiguous).
  """
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_matches(state_type))
           if isinstance(x, state_type)]
  if len(found) > 1:
    raise ValueError(f'{len(found)} states of type {state_type.__name__} in '
                     'opt_state; expected at most one')
  return found[0] if found else None


def replace_state(opt_state: Any, state_type: Type[S],
                  fn: Callable[[S], S]) -> Any:
  """opt_state with fn applied to its unique `state_type` state.

  E.g. `replace_state(opt_state, EwcState, lambda s: ewc.consolidate(s, p, f))`.
  Raises ValueError if there is no such state (the strategy is not active).
  """
  if find_state(opt_state, state_type) is None:
    raise ValueError(f'no {state_type.__name__} in opt_state (is the strategy '
                     'in strategy.names?)')
  return jax.tree.map(lambda x: fn(x) if isinstance(x, state_type) else x,
                      opt_state, is_leaf=_matches(state_type))
