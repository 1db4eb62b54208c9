r"""Default clflax run: VOC segmentation -> COCO detection -> Imagenette classification.

One ImageNet-pretrained EfficientNet-Lite0 backbone with three heads learns the three tasks in sequence with no
continual-learning strategy ('naive' fine-tuning). Every field, with its comment, is in `clflax/configs/default.py`
(importable, so a config file of your own can start from it too); the strategy configs beside this one change only
their strategy's fields.

Command (bundled sample data, CPU; add --config.data_dir=/path/to/data for the full mini sets):
  python launch.py --config configs/default.py
Full mini sets, 2-core CPU: ~10 min (seed-0 scores: docs/results/vision.md).
Smoke preset (tiny model, 64 px, a few steps; ~1-2 min on CPU):
  python launch.py --config configs/default.py:smoke
"""
from clflax.configs import default


def get_config(arg=None):
  return default.get_config(arg)
