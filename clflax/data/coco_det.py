"""COCO-format object detection as a TFDS builder over a local folder.

Layouts: the official `annotations/instances_{train,val}2017.json` + `{train,val}2017/` (any year),
and the mini export `{train,val}/labels.json` + `{train,val}/data/`. Categories are mapped BY NAME
onto COCO_CLASSES (exports number their categories freely: the mini set's ids differ per split).

Stored per image: `boxes` float32 [N, 4] (ymin, xmin, ymax, xmax) in pixels, clipped to the image;
`classes` int64 [N] indices into COCO_CLASSES; `is_crowd` bool [N]; `image_id` (the JSON's id);
`file_name`. Crowd boxes are kept and flagged here; the pipeline drops them from training targets
and counts them (metadata 'num_crowd'). Images without boxes are kept.
"""
import collections
import functools
import json
import math
import pathlib
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from clflax.data import builder_util

# The 80 COCO categories in the standard order (official category ids COCO_CATEGORY_IDS).
COCO_CLASSES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog',
    'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella',
    'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite',
    'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange',
    'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant',
    'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone',
    'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors',
    'teddy bear', 'hair drier', 'toothbrush')
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91)
                          if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))
# Spellings met in other exports (VOC names, 'hair dryer') for the same categories.
_ALIASES = {'aeroplane': 'airplane', 'motorbike': 'motorcycle', 'sofa': 'couch', 'tvmonitor': 'tv',
            'diningtable': 'dining table', 'pottedplant': 'potted plant', 'hair dryer': 'hair drier'}
_CLASS_INDEX = {name: i for i, name in enumerate(COCO_CLASSES)}
SPLITS = ('train', 'val')


class ImageRecord(NamedTuple):
  """One image of a COCO JSON with its valid annotations (pixels, before clipping)."""
  image_id: int
  file_name: str
  height: int
  width: int
  boxes: list  # (ymin, xmin, ymax, xmax) per annotation.
  classes: list
  is_crowd: list


def class_index(name: str) -> int | None:
  """Index of a category name in COCO_CLASSES (case-insensitive, known aliases), or None."""
  name = name.strip().lower()
  return _CLASS_INDEX.get(_ALIASES.get(name, name))


def find_splits(source: pathlib.Path) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
  """(annotation JSON, image folder) per split in either layout; {} when neither is found."""
  out = {}
  for split in SPLITS:
    official = sorted((source / 'annotations').glob(f'instances_{split}20[0-9][0-9].json'))
    if official:
      out[split] = (official[-1], source / official[-1].stem.removeprefix('instances_'))
    elif (source / split / 'labels.json').exists():
      out[split] = (source / split / 'labels.json', source / split / 'data')
  return out


def _load_json(path: pathlib.Path) -> dict[str, Any]:
  try:
    data = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ValueError(f'{path}: malformed COCO JSON ({err})') from err
  if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                           for k in ('images', 'annotations', 'categories')):
    raise ValueError(f'{path}: not a COCO detection file (needs lists images, annotations, categories)')
  return data


def _box(ann: dict[str, Any]) -> tuple[float, float, float, float]:
  """[x, y, w, h] -> (ymin, xmin, ymax, xmax); raises ValueError for a malformed box."""
  box = ann.get('bbox')
  if not isinstance(box, (list, tuple)) or len(box) != 4:
    raise ValueError(f'bbox {box!r} is not [x, y, w, h]')
  x, y, w, h = (float(v) for v in box)
  if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
    raise ValueError(f'bbox {box!r} has no area')
  return (y, x, y + h, x + w)


def parse_coco(path: pathlib.Path, bad_annotation) -> list[ImageRecord]:
  """Reads a COCO JSON; calls bad_annotation(BadInputError) for each unusable annotation."""
  data = _load_json(path)
  try:
    names = {c['id']: c['name'] for c in data['categories']}
    images = {im['id']: im for im in data['images']}
  except (KeyError, TypeError) as err:
    raise ValueError(f'{path}: category or image entry without id/name ({err!r})') from err
  if len(images) != len(data['images']):
    raise ValueError(f'{path}: duplicate image ids')
  anns = collections.defaultdict(list)
  for ann in data['annotations']:
    try:
      if ann.get('image_id') not in images:
        raise ValueError(f'unknown image_id {ann.get("image_id")!r}')
      name = names.get(ann.get('category_id'))
      label = None if name is None else class_index(name)
      if label is None:
        raise ValueError(f'category {name or ann.get("category_id")!r} is not a COCO class')
      anns[ann['image_id']].append((_box(ann), label, bool(ann.get('iscrowd', 0))))
    except (ValueError, TypeError, AttributeError) as err:
      ann_id = ann.get('id', '?') if isinstance(ann, dict) else '?'
      bad_annotation(builder_util.BadInputError(f'{path.name} annotation {ann_id} ({err})'))
  records = []
  for image_id, im in images.items():
    boxes, classes, crowd = zip(*anns[image_id]) if anns[image_id] else ((), (), ())
    records.append(ImageRecord(int(image_id), str(im.get('file_name', '')), int(im.get('height', 0)),
                               int(im.get('width', 0)), list(boxes), list(classes), list(crowd)))
  return records


class CocoDet(builder_util.SourceFolderBuilder, skip_registration=True):
  """COCO-format detection over the 80 COCO classes; boxes (ymin, xmin, ymax, xmax) in pixels."""

  name = 'clflax_coco_det'
  VERSION = tfds.core.Version('1.0.0')
  LAYOUT = ('annotations/instances_{train,val}2017.json + {train,val}2017/ or '
            '{train,val}/labels.json + {train,val}/data/')

  @classmethod
  def check_layout(cls, source_dir):
    splits = find_splits(source_dir)
    for split in SPLITS:
      if split not in splits:
        raise cls.layout_error(source_dir, f'no {split} annotation JSON')
      if not splits[split][1].is_dir():
        raise cls.layout_error(source_dir, f'image folder {splits[split][1].name}/ missing')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'image_id': np.int64,
            'file_name': tfds.features.Text(),
            'boxes': tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            'classes': tfds.features.Tensor(shape=(None,), dtype=np.int64),
            'is_crowd': tfds.features.Tensor(shape=(None,), dtype=np.bool_),
        }),
        metadata=self._metadata(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    return {split: self._generate_examples(split, json_path, image_dir)
            for split, (json_path, image_dir) in find_splits(self._source_dir).items()}

  def _generate_examples(self, split, json_path, image_dir):
    bad = functools.partial(self.bad_input, split, 'annotations')
    records = parse_coco(json_path, bad)
    self.count_candidates(split, 'files', len(records))
    box_counts = collections.Counter()
    num_crowd = num_annotations = 0
    for rec in records:
      try:
        image, (height, width) = builder_util.read_image(image_dir / rec.file_name)
        if (rec.height, rec.width) not in ((height, width), (0, 0)):
          raise builder_util.BadInputError(f'{rec.file_name} ({json_path.name} says '
                                           f'{rec.height}x{rec.width}, image is {height}x{width})')
      except builder_util.BadInputError as err:
        self.bad_input(split, 'files', err)
        continue
      boxes = np.asarray(rec.boxes, np.float32).reshape(-1, 4)
      boxes = np.clip(boxes, 0, np.array([height, width, height, width], np.float32))
      keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
      for i in np.flatnonzero(~keep):
        bad(builder_util.BadInputError(f'{rec.file_name} box {i} (outside the image)'))
      crowd = np.asarray(rec.is_crowd, bool)[keep]
      num_crowd += int(crowd.sum())
      num_annotations += int(keep.sum())
      box_counts[int((~crowd).sum())] += 1
      yield rec.image_id, {
          'image': image, 'image_id': rec.image_id, 'file_name': rec.file_name,
          'boxes': boxes[keep], 'classes': np.asarray(rec.classes, np.int64)[keep],
          'is_crowd': crowd,
      }
    meta = self.info.metadata
    meta['candidates'][split]['annotations'] = num_annotations + len(
        meta['skipped'].get(split, {}).get('annotations', []))
    meta.setdefault('num_crowd', {})[split] = num_crowd
    # Non-crowd boxes per image -> number of images: tells how many boxes a max_boxes cap drops.
    meta.setdefault('box_counts', {})[split] = {str(k): v for k, v in sorted(box_counts.items())}


def load(source_dir, *, cache_dir=None, skip_bad=False):
  """Prepares (once) and returns {'train', 'val'} data sources of COCO detection."""
  return builder_util.prepare(CocoDet, source_dir, cache_dir=cache_dir,
                              skip_bad=skip_bad).as_data_source()
