"""Which folder feeds which task, the bundled sample as the default, and the prepared TFDS sources.

`config.data_dir` is the root ('' = the real sample shipped in `clflax/data/sample/`) and
`config.data.{voc_seg,coco_det,imagenette,mnist}` name the sub-folders under it.
"""
import importlib.resources
import os
import pathlib
from typing import Any, Mapping

from clflax.data import builder_util
from clflax.data import coco_det
from clflax.data import imagenette
from clflax.data import mnist
from clflax.data import voc_seg

TASKS = ('seg', 'det', 'cls')
# Task -> (config.data field, its default sub-folder, loader, evaluation split).
_DATASETS = {
    'seg': ('voc_seg', 'mini_voc_seg', voc_seg.load, 'val'),
    'det': ('coco_det', 'mini_coco_det', coco_det.load, 'val'),
    'cls': ('imagenette', 'imagenette_160', imagenette.load, 'val'),
    'mnist': ('mnist', 'mnist', mnist.load, 'test'),
}


def default_data_dir() -> str:
  """The bundled sample (same layouts as the mini sets), used when config.data_dir is ''."""
  return str(importlib.resources.files('clflax.data') / 'sample')


def _field(data_cfg: Any, name: str, default: Any) -> Any:
  if data_cfg is None:
    return default
  if isinstance(data_cfg, Mapping):
    return data_cfg.get(name, default)
  return getattr(data_cfg, name, default)


def task_folder(task: str, data_dir: str = '', data_cfg: Any = None) -> pathlib.Path:
  """Source folder of a task ('seg', 'det', 'cls' or 'mnist')."""
  if task not in _DATASETS:
    raise ValueError(f'unknown task {task!r}; expected one of {sorted(_DATASETS)}')
  field, default, _, _ = _DATASETS[task]
  root = os.path.expanduser(data_dir) if data_dir else default_data_dir()
  return pathlib.Path(root) / (_field(data_cfg, field, default) or default)


def eval_split(task: str) -> str:
  return _DATASETS[task][3]


def load_task_source(task: str, data_dir: str = '', data_cfg: Any = None,
                     cache_dir: str | None = None, skip_bad: bool = False) -> dict[str, Any]:
  """{split: TFDS data source} of a task, prepared under cache_dir on first use.

  `data_cfg` is `config.data` (a ConfigDict or a mapping; missing fields take the defaults).
  """
  folder = task_folder(task, data_dir, data_cfg)
  cache_dir = cache_dir or _field(data_cfg, 'cache_dir', '') or None
  return _DATASETS[task][2](folder, cache_dir=cache_dir, skip_bad=skip_bad)


def describe_data(data_dir: str = '', data_cfg: Any = None) -> str:
  """One line: which data a run uses and how to point it at the full sets."""
  folders = ', '.join(f'{t}={task_folder(t, data_dir, data_cfg).name}' for t in TASKS)
  if not data_dir:
    return (f'the small real sample bundled at {default_data_dir()} ({folders}; 32-40 train '
            '/ 8-10 val images per task, ~160 px); for the full sets pass '
            '--config.data_dir=/path (sub-folders: --config.data.voc_seg, .coco_det, .imagenette)')
  cache = _field(data_cfg, 'cache_dir', '') or builder_util.DEFAULT_CACHE_DIR
  return f'{os.path.expanduser(data_dir)} ({folders}); prepared copies cached under {cache}'


def short_description(data_dir: str = '') -> str:
  """'bundled sample' or the data folder, for the run's first console line."""
  return os.path.expanduser(data_dir) if data_dir else 'the bundled sample (--config.data_dir=... for real data)'
