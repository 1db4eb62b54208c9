"""Per-example numpy/PIL transforms of the input pipeline: decode, crop + resize, flip, boxes.

A crop is (y0, x0, height, width) in pixels of the source image, with pixel i covering [i, i + 1);
the crop is resized to size x size (aspect ratio not kept: a plain resize, as in evaluation where
the crop is the whole image). A flip mirrors the output, so a box's x maps to size - x. The same
crop and flip are applied to the image, the mask (NEAREST) and the boxes, which keeps them aligned.
"""
import io
import math
from typing import NamedTuple

import numpy as np
from PIL import Image

LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


class Crop(NamedTuple):
  y0: float
  x0: float
  height: float
  width: float


def full_crop(height: int, width: int) -> Crop:
  return Crop(0., 0., float(height), float(width))


def center_crop(height: int, width: int, fraction: float) -> Crop:
  """The central square of side `fraction` x the shorter side (ImageNet-style evaluation: 0.875)."""
  side = fraction * min(height, width)
  return Crop((height - side) / 2, (width - side) / 2, side, side)


def sample_crop(rng: np.random.Generator, height: int, width: int, min_area: float) -> Crop:
  """Random crop with area fraction in [min_area, 1] and aspect ratio in [3/4, 4/3]."""
  for _ in range(10):
    area = rng.uniform(min_area, 1.) * height * width
    ratio = math.exp(rng.uniform(*LOG_RATIO))
    w, h = math.sqrt(area * ratio), math.sqrt(area / ratio)
    if w <= width and h <= height:
      return Crop(rng.uniform(0, height - h), rng.uniform(0, width - w), h, w)
  return full_crop(height, width)


def open_image(data: bytes | np.ndarray) -> Image.Image:
  """A lazily decoded PIL image from encoded bytes, or one wrapping a uint8 array."""
  if isinstance(data, np.ndarray):
    data = np.asarray(data).astype(np.uint8, copy=False)
    return Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data)
  return Image.open(io.BytesIO(data))


def crop_resize_image(img: Image.Image, crop: Crop, size: int, flip: bool) -> np.ndarray:
  """uint8 [size, size, 3]: the crop of img, resized bilinearly (antialiased), maybe flipped."""
  full_w, full_h = img.size
  if img.format == 'JPEG':
    # Decode at 1/2, 1/4 or 1/8 scale when that still leaves >= size pixels across the crop.
    img.draft('RGB', (math.ceil(full_w * size / crop.width), math.ceil(full_h * size / crop.height)))
  sx, sy = img.size[0] / full_w, img.size[1] / full_h
  box = (crop.x0 * sx, crop.y0 * sy, (crop.x0 + crop.width) * sx, (crop.y0 + crop.height) * sy)
  out = np.asarray(img.convert('RGB').resize((size, size), Image.BILINEAR, box=box))
  return out[:, ::-1] if flip else out


def crop_resize_mask(mask: Image.Image, crop: Crop, size: int, flip: bool) -> np.ndarray:
  """int32 [size, size] class indices (palette indices, not colours), NEAREST-resampled."""
  if mask.mode not in ('P', 'L'):
    raise ValueError(f'mask mode {mask.mode}: expected palette or grey class indices')
  box = (crop.x0, crop.y0, crop.x0 + crop.width, crop.y0 + crop.height)
  out = np.asarray(mask.resize((size, size), Image.NEAREST, box=box), np.int32)
  return out[:, ::-1] if flip else out


def _area(boxes: np.ndarray) -> np.ndarray:
  return (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)


def crop_resize_boxes(boxes: np.ndarray, crop: Crop, size: int, flip: bool,
                      min_visible: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
  """Boxes (ymin, xmin, ymax, xmax) mapped into the output, and which to keep.

  A box is kept when at least `min_visible` of its area lies inside the crop.
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  offset = np.array([crop.y0, crop.x0, crop.y0, crop.x0], np.float32)
  scale = np.array([size / crop.height, size / crop.width] * 2, np.float32)
  mapped = (boxes - offset) * scale
  clipped = np.clip(mapped, 0., float(size))
  inside = _area(clipped)
  keep = (inside > 0) & (inside >= min_visible * _area(mapped))
  if flip:
    clipped = np.stack([clipped[:, 0], size - clipped[:, 3], clipped[:, 2], size - clipped[:, 1]], -1)
  return clipped, keep


def pad_boxes(boxes: np.ndarray, classes: np.ndarray,
              max_boxes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(boxes float32 [M, 4], classes int32 [M], valid bool [M]); beyond M the largest are kept."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  if len(boxes) > max_boxes:
    kept = np.sort(np.argsort(-_area(boxes), kind='stable')[:max_boxes])
    boxes, classes = boxes[kept], np.asarray(classes)[kept]
  n = len(boxes)
  out_boxes = np.zeros((max_boxes, 4), np.float32)
  out_classes = np.zeros((max_boxes,), np.int32)
  out_boxes[:n], out_classes[:n] = boxes, classes
  return out_boxes, out_classes, np.arange(max_boxes) < n
