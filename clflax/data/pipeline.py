"""grain input pipelines: fixed-shape numpy batches per task, indexable by global step.

Batches are dicts (B = batch size per process, S = image size, M = max_boxes):
  seg: image uint8 [B, S, S, 3], mask int32 [B, S, S] (0..20, 255 = ignore)
  det: image, boxes float32 [B, M, 4] (ymin, xmin, ymax, xmax) in pixels of the S x S image,
       classes int32 [B, M] (indices into COCO_CLASSES), box_valid bool [B, M], image_id int32 [B]
  cls: image, label int32 [B]
and `valid` bool [B] (False only on the padding rows of the last evaluation batch).

`make_train_dataset(...)[step]` is the batch of a global step: the shard is reshuffled every epoch
and augmented with grain's per-element rng, so a resumed run needs only its step. Images are plain
resized to S x S (aspect ratio not kept; un-augmented classification images are centre-cropped first,
`CENTER_CROP`); training first takes a random crop (area fraction
[min_area, 1], aspect ratio [3/4, 4/3]) and a horizontal flip, applied alike to image, mask and
boxes. Crowd boxes are dropped from the detection targets; beyond max_boxes the largest are kept.
Sources are TFDS data sources (`sources.load_task_source`) or any sequence of dicts with the
same fields (numpy images instead of encoded bytes).
"""
import dataclasses
import functools
import itertools
import math
from typing import Any, Iterator, Sequence

from absl import logging
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from clflax.data import inputs
from clflax.data import sources
from clflax.data import transforms

TASKS = sources.TASKS
MIN_AREA = {'seg': 0.3, 'det': 0.3, 'cls': 0.25}  # Smallest crop, as a fraction of the image area.
# Un-augmented classification images (evaluation, memories): the central square of 0.875 x the shorter side, the
# ImageNet protocol the pretrained weights expect (the ImageNet head scores 100 % on the Imagenette val images so,
# 96.7 % on plainly resized ones). Masks and boxes are evaluated on the whole image.
CENTER_CROP = {'cls': 0.875}


def _check(task: str, **sizes: int) -> None:
  if task not in TASKS:
    raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')
  for name, value in sizes.items():
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'{name} must be a positive int, got {value!r}')


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} is not in [0, process_count={count})')
  return index, count


def undecoded(source: Sequence[Any]) -> Sequence[Any]:
  """The TFDS source returning encoded image bytes: decoded here with PIL, at reduced scale."""
  if not dataclasses.is_dataclass(source) or not hasattr(source, 'dataset_info'):
    return source
  images = [k for k, f in source.dataset_info.features.items()
            if isinstance(f, tfds.features.Image)]
  return dataclasses.replace(source, decoders={k: tfds.decode.SkipDecoding() for k in images})


def _example(task: str, ex: dict, crop_rng: np.random.Generator | None, *, image_size: int,
             max_boxes: int, min_area: float) -> dict[str, np.ndarray]:
  """One example in batch layout; augmented (random crop + flip) when crop_rng is given."""
  img = transforms.open_image(ex['image'])
  width, height = img.size
  if crop_rng is None:
    crop = (transforms.center_crop(height, width, CENTER_CROP[task]) if task in CENTER_CROP
            else transforms.full_crop(height, width))
    flip = False
  else:
    crop = transforms.sample_crop(crop_rng, height, width, min_area)
    flip = bool(crop_rng.random() < 0.5)
  out = {'image': transforms.crop_resize_image(img, crop, image_size, flip)}
  if task == 'seg':
    mask = transforms.open_image(ex['mask'])
    if mask.size != (width, height):
      raise ValueError(f'mask size {mask.size} differs from image size {(width, height)}')
    out['mask'] = transforms.crop_resize_mask(mask, crop, image_size, flip)
  elif task == 'det':
    crowd = np.asarray(ex.get('is_crowd', np.zeros(len(ex['classes']), bool)), bool)
    boxes, keep = transforms.crop_resize_boxes(
        np.asarray(ex['boxes']).reshape(-1, 4)[~crowd], crop, image_size, flip)
    out['boxes'], out['classes'], out['box_valid'] = transforms.pad_boxes(
        boxes[keep], np.asarray(ex['classes'])[~crowd][keep], max_boxes)
    out['image_id'] = np.int32(ex['image_id'])
  else:
    out['label'] = np.int32(ex['label'])
  out['valid'] = np.bool_(True)
  return out


def _augmented(task: str, ex: dict, rng: np.random.Generator, **kwargs) -> dict[str, np.ndarray]:
  return _example(task, ex, rng, **kwargs)


def det_target_stats(source: Sequence[Any], max_boxes: int) -> dict[str, int] | None:
  """Crowd boxes excluded and boxes beyond max_boxes dropped, from the builder's metadata."""
  info = getattr(source, 'dataset_info', None)
  split = str(getattr(source, 'split', ''))
  meta = info.metadata if info is not None and info.metadata else {}
  if split not in meta.get('box_counts', {}):
    return None
  counts = {int(k): v for k, v in meta['box_counts'][split].items()}
  return {'num_crowd': int(meta['num_crowd'][split]),
          'images_over_max': sum(v for k, v in counts.items() if k > max_boxes),
          'boxes_dropped': sum((k - max_boxes) * v for k, v in counts.items() if k > max_boxes)}


def _log_det_stats(source, max_boxes: int) -> None:
  stats = det_target_stats(source, max_boxes)
  if stats and stats['boxes_dropped']:
    logging.info('det %s: %d crowd boxes excluded from targets; %d images have more than %d boxes '
                 '(%d smallest dropped)', getattr(source, 'split', ''), stats['num_crowd'],
                 stats['images_over_max'], max_boxes, stats['boxes_dropped'])


def make_train_dataset(task: str, source: Sequence[Any], *, image_size: int, batch_size: int,
                       seed: int, max_boxes: int = 32, augment: bool = True,
                       min_area: float | None = None, process_index: int | None = None,
                       process_count: int | None = None) -> grain.MapDataset:
  """Infinite MapDataset of this process's part of each global training batch of `batch_size` examples: `ds[step]`
  is rows [i * b, (i + 1) * b) of global batch `step` (process i of n, b = batch_size // n). The global batches,
  their order and their augmentation (seeded by the example's position in the global stream) are those of a
  one-process run, so a run gives the same results on any number of processes."""
  _check(task, image_size=image_size, batch_size=batch_size, max_boxes=max_boxes)
  if not 0 <= seed < 2**32:
    raise ValueError(f'seed must be in [0, 2**32), got {seed}')
  index, count = _process(process_index, process_count)
  if batch_size % count:
    raise ValueError(f'the global batch of {batch_size} does not split over {count} processes')
  if task == 'det':
    _log_det_stats(source, max_boxes)
  kwargs = dict(image_size=image_size, max_boxes=max_boxes,
                min_area=MIN_AREA[task] if min_area is None else min_area)
  ds = grain.MapDataset.source(undecoded(source)).seed(seed).shuffle().repeat()
  if augment:
    ds = ds.random_map(functools.partial(_augmented, task, **kwargs))
  else:
    ds = ds.map(functools.partial(_example, task, crop_rng=None, **kwargs))
  if count == 1:
    return ds.batch(batch_size, drop_remainder=True)
  # Element j of this process's stream is element (j // b) * batch_size + i * b + j % b of the global stream.
  local, stream = batch_size // count, ds
  positions = grain.MapDataset.range(len(stream) // batch_size * local)
  return positions.map(lambda j: stream[(j // local) * batch_size + index * local + j % local]).batch(
      local, drop_remainder=True)


def steps_per_epoch(source: Sequence[Any], batch_size: int) -> int:
  """Full global batches of `batch_size` in one pass over the training examples."""
  return len(source) // batch_size


def _eval_row(task: str, source, rows: np.ndarray, num_real: int, i: int, **kwargs) -> dict:
  out = _example(task, source[int(rows[i])], None, **kwargs)
  out['valid'] = np.bool_(i < num_real)
  return out


def make_eval_batches(task: str, source: Sequence[Any], *, image_size: int, batch_size: int,
                      max_boxes: int = 32, max_examples: int = 0, process_index: int | None = None,
                      process_count: int | None = None) -> grain.MapDataset:
  """Padded evaluation batches of this process's share of the split (each example once).

  Every process gets the same number of batches (a collective eval step needs that); padding
  rows repeat a real example with valid=False. `max_examples` > 0 keeps the first ones.
  """
  _check(task, image_size=image_size, batch_size=batch_size, max_boxes=max_boxes)
  index, count = _process(process_index, process_count)
  total = min(len(source), max_examples) if max_examples else len(source)
  if not total:
    raise ValueError(f'{task}: the evaluation split is empty')
  if task == 'det':
    _log_det_stats(source, max_boxes)
  num_batches = math.ceil(math.ceil(total / count) / batch_size)
  mine = np.arange(index, total, count)
  rows = np.full(num_batches * batch_size, mine[0] if mine.size else 0)
  rows[:mine.size] = mine
  row_fn = functools.partial(_eval_row, task, undecoded(source), rows, mine.size,
                             image_size=image_size, max_boxes=max_boxes, min_area=0.)
  return grain.MapDataset.range(len(rows)).map(row_fn).batch(batch_size)


def iterate(ds, start_step: int = 0, num_steps: int | None = None, *,
            num_threads: int = 2, prefetch: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """Batches `ds[start_step]`, `ds[start_step + 1]`, ... in that order; a grain MapDataset's are decoded ahead by
  `num_threads` background threads (up to `prefetch` batches), so the order, and a resume, are as with `ds[step]`.
  Other indexable sets (in-memory arrays) are read inline, as is everything with num_threads=0."""
  stop = None if num_steps is None else start_step + num_steps
  if not isinstance(ds, grain.MapDataset) or num_threads == 0:
    return (ds[step] for step in (itertools.count(start_step) if stop is None else range(start_step, stop)))
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch, 1))
  return iter(ds[start_step:stop].to_iter_dataset(options))


def sample_examples(task: str, source: Sequence[Any], n: int, seed: int, image_size: int, *,
                    class_balanced: bool = False, max_boxes: int = 32) -> dict[str, np.ndarray]:
  """n distinct un-augmented examples, stacked (episodic memories, Fisher samples).

  class_balanced (cls only) takes n // C of every class (the remainder from random classes).
  """
  _check(task, image_size=image_size, max_boxes=max_boxes)
  raw = undecoded(source)
  rng = np.random.default_rng(seed)
  if not 0 < n <= len(raw):
    raise ValueError(f'cannot sample {n} examples from a source of {len(raw)}')
  if class_balanced:
    if task != 'cls':
      raise ValueError(f'class_balanced sampling needs labels: task cls, not {task!r}')
    labels = np.array([int(raw[i]['label']) for i in range(len(raw))])
    classes = np.unique(labels)
    want = np.full(len(classes), n // len(classes))
    want[rng.choice(len(classes), n % len(classes), replace=False)] += 1
    short = [int(c) for c, k in zip(classes, want) if k > np.sum(labels == c)]
    if short:
      raise ValueError(f'classes {short} have too few examples for a balanced sample of {n}')
    rows = np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=False)
                           for c, k in zip(classes, want)])
  else:
    rows = rng.choice(len(raw), n, replace=False)
  examples = [_example(task, raw[int(i)], None, image_size=image_size, max_boxes=max_boxes,
                       min_area=0.) for i in np.sort(rows)]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def trainer_data(config, *, process_index: int | None = None, process_count: int | None = None):
  """The `inputs.Data` of a config: per-process train sets, eval batches and memory examples."""
  index, count = _process(process_index, process_count)
  if config.train.batch_size % count:
    raise ValueError(f'train.batch_size={config.train.batch_size} is not divisible by {count} processes')
  batch = config.train.batch_size
  size, data = config.model.image_size, config.data
  common = dict(image_size=size, max_boxes=data.max_boxes)
  train_sets, steps, eval_batches, srcs = {}, {}, {}, {}
  for task in config.tasks:
    srcs[task] = sources.load_task_source(task, config.data_dir, data, skip_bad=data.skip_bad)
    train = srcs[task]['train']
    steps[task] = steps_per_epoch(train, batch)
    if not steps[task]:
      raise ValueError(f'{task}: {len(train)} training examples give no full batch of {batch}')
    if config.train.steps_per_epoch:
      steps[task] = min(steps[task], config.train.steps_per_epoch)
    train_sets[task] = make_train_dataset(task, train, batch_size=batch, seed=config.seed,
                                          augment=data.augment, process_index=index, process_count=count, **common)
    # Every process reads every evaluation batch: the eval step splits it over all devices and returns its outputs
    # replicated, so each process scores the whole split (and the host-side metrics need no gathering).
    eval_batches[task] = make_eval_batches(
        task, srcs[task][sources.eval_split(task)], batch_size=config.train.eval_batch_size,
        max_examples=config.eval.max_examples, process_index=0, process_count=1, **common)

  def memory_examples(task: str, count: int | None) -> dict[str, np.ndarray]:
    train = srcs[task]['train']
    wanted = len(train) if count is None else min(len(train), max(count, 1))
    return sample_examples(task, train, wanted, config.seed, size, class_balanced=task == 'cls' and count is not None,
                           max_boxes=data.max_boxes)

  return inputs.Data(
      description=sources.describe_data(config.data_dir, data), train_sets=train_sets,
      steps_per_epoch=steps, eval_batches=eval_batches,
      example_batches={t: s[0] for t, s in train_sets.items()}, memory_examples=memory_examples,
      class_ids={t: tuple(folders) for t in srcs if (folders := _class_folders(srcs[t]['train']))})


def _class_folders(source) -> list[str]:
  """A folder-per-class source's class folders in label order (Imagenette: WordNet ids); [] for other sources."""
  info = getattr(source, 'dataset_info', None)
  return list(info.metadata.get('folders') or []) if info is not None and info.metadata else []
