"""Datasets of clflax: TFDS builders over local folders, grain pipelines, classic benchmarks.

- `sources`: which folder feeds which task; `load_task_source`, `default_data_dir` (the real sample
  bundled in `clflax/data/sample/`), `describe_data`.
- Builders (array_record, read with `as_data_source`): `voc_seg`, `coco_det`, `imagenette`, `mnist`.
- `pipeline`: fixed-shape numpy batches per task ('seg', 'det', 'cls') indexed by global step.
- `benchmarks`: Permuted / Rotated / Split MNIST task sequences.
- `make_sample`: rebuilds the bundled sample from the shared mini sets.
"""
from clflax.data.sources import default_data_dir
from clflax.data.sources import describe_data
from clflax.data.sources import load_task_source
