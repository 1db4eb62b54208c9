"""Progressive Networks (Rusu et al. 2016) as a strategy: the model becomes one column per task.

Each stage trains a new column (`models/progressive.py`) that reads the frozen earlier columns through lateral
adapters; a task is evaluated through its own column, so nothing is forgotten by construction and the task must be
known at test time. The transform keeps every update outside the stage's column at zero, with the column fixed
when the stage's step is compiled (one program per stage). The classic protocols' MLP only.
"""
import ml_collections

from clflax.models import classic
from clflax.models import progressive
from clflax.strategies import base


def _validate(cfg, names, config=None):
  del cfg
  base.require_alone('progressive', names, 'progressive replaces the model')
  if config is not None:
    base.require_classic('progressive', config, 'a Progressive Network of the MLP, a column per task')


def _model(cfg, config, model):
  del cfg  # The columns replace the plain MLP (and keep its computation dtype).
  return classic.ProgressiveClassicNet(tuple(config.tasks), tuple(config.model.hidden), classic.num_classes(config),
                                       model.dtype)


STRATEGY = base.Strategy(
    name='progressive', config=ml_collections.ConfigDict, validate=_validate,
    transform=lambda cfg, stage: progressive.train_column_only(stage.index), phase='update', stage_program=True,
    model=_model)
