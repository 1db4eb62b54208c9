"""PASCAL VOC 2012 semantic segmentation as a TFDS builder over a local folder.

Two layouts are read: the official `VOCdevkit/VOC2012` tree (the folder itself, or a parent holding
`VOC2012/` or `VOCdevkit/VOC2012/`) and the flat mini layout `{train,val}/<id>.jpg` + `<id>.png`.
Masks are palette PNGs read as class indices (0 = background, 1..20 objects, 255 = void), never
as RGB colours.
"""
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from clflax.data import builder_util

VOC_CLASSES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
    'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor')
IGNORE_LABEL = 255
SPLITS = ('train', 'val')
_VALID_VALUES = np.array([*range(len(VOC_CLASSES)), IGNORE_LABEL])


def _devkit_root(source: pathlib.Path) -> pathlib.Path | None:
  for root in (source, source / 'VOC2012', source / 'VOCdevkit' / 'VOC2012'):
    if (root / 'ImageSets' / 'Segmentation').is_dir():
      return root
  return None


def list_examples(source: pathlib.Path) -> dict[str, list[tuple[str, pathlib.Path, pathlib.Path]]]:
  """(id, image path, mask path) per split, for either layout; missing files surface later."""
  root = _devkit_root(source)
  if root is not None:
    out = {}
    for split in SPLITS:
      ids = (root / 'ImageSets' / 'Segmentation' / f'{split}.txt').read_text().split()
      out[split] = [(i, root / 'JPEGImages' / f'{i}.jpg', root / 'SegmentationClass' / f'{i}.png')
                    for i in ids]
    return out
  return {split: [(p.stem, p, p.with_suffix('.png'))
                  for p in sorted((source / split).glob('*.jpg'))] for split in SPLITS}


class VocSeg(builder_util.SourceFolderBuilder, skip_registration=True):
  """PASCAL VOC 2012 segmentation: 21 classes, 255 = void (ignore in loss and mIoU)."""

  name = 'clflax_voc_seg'
  VERSION = tfds.core.Version('1.0.0')
  LAYOUT = ('VOCdevkit/VOC2012 (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/'
            '{train,val}.txt) or flat {train,val}/<id>.jpg + <id>.png palette masks')

  @classmethod
  def check_layout(cls, source_dir):
    root = _devkit_root(source_dir)
    if root is not None:
      for need in ('JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation/train.txt',
                   'ImageSets/Segmentation/val.txt'):
        if not (root / need).exists():
          raise cls.layout_error(source_dir, f'{need} missing')
      return
    for split in SPLITS:
      if not any((source_dir / split).glob('*.jpg')):
        raise cls.layout_error(source_dir, f'no {split}/*.jpg')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'mask': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'id': tfds.features.Text(),
        }),
        metadata=self._metadata(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    return {split: self._generate_examples(split, items)
            for split, items in list_examples(self._source_dir).items()}

  def _generate_examples(self, split, items):
    self.count_candidates(split, 'files', len(items))
    for key, image_path, mask_path in items:
      try:
        image, (height, width) = builder_util.read_image(image_path)
        if not mask_path.exists():
          raise builder_util.BadInputError(f'{image_path.name} (mask {mask_path.name} missing)')
        mask, values = builder_util.read_label_png(mask_path)
        if values.shape != (height, width):
          raise builder_util.BadInputError(
              f'{mask_path.name} (mask {values.shape} does not match image {(height, width)})')
        bad = np.setdiff1d(np.unique(values), _VALID_VALUES)
        if bad.size:
          raise builder_util.BadInputError(f'{mask_path.name} (values {bad.tolist()} not in 0..20, 255)')
      except builder_util.BadInputError as err:
        self.bad_input(split, 'files', err)
        continue
      yield key, {'image': image, 'mask': mask, 'id': key}


def load(source_dir, *, cache_dir=None, skip_bad=False):
  """Prepares (once) and returns {'train', 'val'} data sources of VOC segmentation."""
  return builder_util.prepare(VocSeg, source_dir, cache_dir=cache_dir,
                              skip_bad=skip_bad).as_data_source()
