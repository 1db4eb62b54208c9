"""The run's state as values: the arrays (`TrainTree`) and where the run stands (`Progress`), saved together.

`TrainTree` holds every array a resume needs; `Progress` is the JSON beside it in each checkpoint (position in the
run, scores so far, curves, times). A checkpoint written by an older version of the code lacks the fields added
since: `Progress.from_json` fills them with their defaults, which reproduce the older behaviour.
"""
import dataclasses
from typing import Any, NamedTuple, Optional

import jax

PyTree = Any


class TrainState(NamedTuple):
  step: jax.Array  # Global optimisation step, across stages.
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree  # The optax chain's state: every strategy's state and the base optimizer's.
  rng: jax.Array


class Context(NamedTuple):
  """What earlier stages left for later ones; read by the train step, never trained."""
  # Episodic memories (see strategies/replay.py for the two layouts); {} without a memory strategy.
  memories: dict
  teacher: dict  # {'params', 'batch_stats'} after the previous stage when a strategy needs it, else {}.


class TrainTree(NamedTuple):
  """Every array of a run, as checkpointed."""
  state: TrainState
  context: Context
  best: dict  # {'params', 'batch_stats'} of the stage's best epoch so far (early stopping keeps them).


@dataclasses.dataclass
class Progress:
  """Where a run stands; saved as JSON beside the arrays of every checkpoint."""
  saves: int = 0  # Checkpoints written so far (orders stage snapshots and progress checkpoints).
  stage: int = 0  # Index of the stage in progress (or next).
  epoch: int = 0  # Next epoch of that stage.
  stage_step: int = 0  # Steps done in that stage.
  best_score: Optional[float] = None  # Best validation score of the stage so far (early stopping).
  bad_epochs: int = 0  # Epochs since it improved.
  baseline: Optional[dict] = None  # Scores of every task before stage 1 (FWT).
  rows: list = dataclasses.field(default_factory=list)  # Scores of every task after each finished stage.
  curves: dict = dataclasses.field(default_factory=dict)  # task -> [[step, loss], ...].
  epoch_scores: dict = dataclasses.field(default_factory=dict)  # task -> validation score after each epoch.
  stage_seconds: list = dataclasses.field(default_factory=list)  # Wall time of each finished stage.
  stage_seconds_so_far: float = 0.0  # Wall time spent in the stage in progress before a resume.
  balanced: bool = False  # The final balancing fine-tune is done.
  before_balance: Optional[dict] = None  # The last row before that fine-tune.
  balance_seconds: float = 0.0  # Its wall time.
  train_seconds: float = 0.0  # Time in the stages' training steps (no compile, eval, checkpoint, consolidation).
  train_steps: int = 0  # Training steps run in them (strategy epochs after training included).
  data_wait_seconds: float = 0.0  # Of that time, spent waiting for the next training batch from the host.

  def to_json(self) -> dict:
    """The fields as they are (no deep copy: `dataclasses.asdict` copied the loss curves' ~10^5 points on every
    save, a quarter of a second late in a 17-task run); the save serialises them at once."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  @classmethod
  def from_json(cls, saved: dict) -> 'Progress':
    """From a checkpoint's JSON; fields it lacks (older code) take their defaults, unknown ones are refused."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - names)
    if unknown:
      raise ValueError(f'the checkpoint records {unknown[0]!r}, which this version of clflax does not know; it was '
                       'written by a newer version: use that version, another --workdir, or --fresh')
    return cls(**saved)

  def start_stage(self, stage: int) -> None:
    """Moves to the start of stage `stage` (no epoch done, no best score yet)."""
    self.stage, self.epoch, self.stage_step = stage, 0, 0
    self.best_score, self.bad_epochs, self.stage_seconds_so_far = None, 0, 0.0
