r"""Makes the small real sample shipped in clflax/data/sample/ from the shared mini sets.

  python -m tools.make_sample --src /path/to/shared/data [--out clflax/data/sample]

Same layouts as the sources (so the same builders read it). Selection is deterministic:
VOC and COCO take, per split, greedily the image adding the most classes not yet covered (ties
by file name) until the quota is met; Imagenette takes the first files of every class; MNIST the
first images of each split. Images are shrunk to SHORT_SIDE px on the short side (never
enlarged) and re-encoded as JPEG quality JPEG_QUALITY; masks are resized NEAREST and keep their
palette; COCO boxes and areas are rescaled. The script writes README.md with the exact file list.
"""
import argparse
import gzip
import json
import pathlib
import shutil

import numpy as np
from PIL import Image

from clflax.data import coco_det
from clflax.data import imagenette
from clflax.data import mnist
from clflax.data import voc_seg

SHORT_SIDE = 160
JPEG_QUALITY = 85
COUNTS = {'train': 32, 'val': 8}  # VOC and COCO images per split.
IMAGENETTE_PER_CLASS = {'train': 4, 'val': 1}
MNIST_COUNTS = {'train': 2000, 'test': 500}


def _greedy_cover(items: list[tuple[str, set]], quota: int) -> list[str]:
  """Names of `quota` items: each step the one adding most uncovered classes (ties by name)."""
  items, chosen, covered = sorted(items), [], set()
  while len(chosen) < min(quota, len(items)):
    name, classes = max((it for it in items if it[0] not in chosen),
                        key=lambda it: len(it[1] - covered))
    chosen.append(name)
    covered |= classes
  return sorted(chosen)


def _scale(img: Image.Image) -> float:
  return min(1., SHORT_SIDE / min(img.size))


def _save_jpeg(src: pathlib.Path, dst: pathlib.Path) -> tuple[float, float]:
  """Shrinks and re-encodes an image; returns the (x, y) scale factors applied."""
  with Image.open(src) as img:
    scale = _scale(img)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    out = img.convert('RGB') if img.mode not in ('RGB', 'L') else img
    out = out.resize(size, Image.LANCZOS) if size != img.size else out
    dst.parent.mkdir(parents=True, exist_ok=True)
    out.save(dst, format='JPEG', quality=JPEG_QUALITY)
    return size[0] / img.width, size[1] / img.height


def make_voc(src: pathlib.Path, out: pathlib.Path) -> dict[str, list[str]]:
  chosen = {}
  for split, items in voc_seg.list_examples(src).items():
    classes = [(key, set(np.unique(np.asarray(Image.open(mask)))) - {0, 255})
               for key, _, mask in items]
    chosen[split] = _greedy_cover(classes, COUNTS[split])
    paths = {key: (image, mask) for key, image, mask in items}
    for key in chosen[split]:
      image, mask = paths[key]
      _save_jpeg(image, out / split / f'{key}.jpg')
      with Image.open(mask) as m, Image.open(image) as im:
        scale = _scale(im)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        m.resize(size, Image.NEAREST).save(out / split / f'{key}.png')  # Palette kept.
  return chosen


def make_coco(src: pathlib.Path, out: pathlib.Path) -> dict[str, list[str]]:
  chosen = {}
  for split, (json_path, image_dir) in coco_det.find_splits(src).items():
    data = json.loads(json_path.read_text())
    names = {c['id']: c['name'] for c in data['categories']}
    by_image = {im['id']: set() for im in data['images']}
    for ann in data['annotations']:
      by_image[ann['image_id']].add(names[ann['category_id']])
    files = {im['id']: im['file_name'] for im in data['images']}
    chosen[split] = _greedy_cover([(files[i], c) for i, c in by_image.items()], COUNTS[split])
    keep = {im['id']: im for im in data['images'] if im['file_name'] in chosen[split]}
    images, annotations = [], []
    for image_id, im in sorted(keep.items()):
      sx, sy = _save_jpeg(image_dir / im['file_name'], out / split / 'data' / im['file_name'])
      images.append(dict(im, width=round(im['width'] * sx), height=round(im['height'] * sy)))
      for ann in data['annotations']:
        if ann['image_id'] == image_id:
          x, y, w, h = ann['bbox']
          ann = {k: v for k, v in ann.items() if k != 'segmentation'}
          annotations.append(dict(ann, bbox=[round(v, 2) for v in (x * sx, y * sy, w * sx, h * sy)],
                                  area=round(ann['area'] * sx * sy, 2)))
    # Categories kept as exported (per-split numbering): the quirk the builder must handle.
    (out / split / 'labels.json').write_text(json.dumps(
        dict(data, images=images, annotations=annotations)))
  return chosen


def make_imagenette(src: pathlib.Path, out: pathlib.Path) -> dict[str, list[str]]:
  chosen = {}
  for split, per_class in IMAGENETTE_PER_CLASS.items():
    chosen[split] = []
    for folder in imagenette.class_folders(src):
      for path in imagenette.list_images(src / split / folder)[:per_class]:
        _save_jpeg(path, out / split / folder / path.name)
        chosen[split].append(f'{folder}/{path.name}')
  return chosen


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
  path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


def make_mnist(src: pathlib.Path, out: pathlib.Path) -> dict[str, list[str]]:
  out.mkdir(parents=True, exist_ok=True)
  data = mnist.read_mnist(src)
  for split, (image_stem, label_stem) in mnist.FILES.items():
    images, labels = data[split]
    _write_idx(out / f'{image_stem}.gz', images[:MNIST_COUNTS[split]])
    _write_idx(out / f'{label_stem}.gz', labels[:MNIST_COUNTS[split]])
  return {'train' if split == 'train' else 't10k': [f'the first {n} images and labels']
          for split, n in MNIST_COUNTS.items()}


_README = """# Bundled real sample (made by `python -m tools.make_sample --src {src}`)

The default data when `config.data_dir` is '': a small subset of the shared mini sets, in the
SAME layouts, so the same TFDS builders read it. Point runs at the full sets with
`--config.data_dir=/path`. Everything here is real public data that nobody on this project made.

How it was made (deterministic; rerun the command above to reproduce it):
- Images: shrunk to {short} px on the short side with Lanczos (never enlarged; Imagenette is
  already 160 px), re-encoded as JPEG quality {quality}.
- VOC masks: palette PNGs resized NEAREST to the image size (class indices 0..20 and 255 kept).
- COCO: `labels.json` keeps only the chosen images and their annotations, bbox and area rescaled
  with the image, `segmentation` dropped; `categories` kept as exported, so category ids still
  differ between the splits (map classes by name).
- Selection: VOC and COCO take per split the image adding the most classes not yet covered
  (ties by file name) until {counts} images; Imagenette the first {inet} files (sorted) of each
  class folder per split; MNIST the first {mnist} images of each split.

| folder | source | licence |
|---|---|---|
| mini_voc_seg/ | PASCAL VOC 2012 segmentation (`mini_voc_seg` of the shared data) | VOC images are from Flickr: use them under the Flickr terms of use; annotations from the PASCAL VOC project |
| mini_coco_det/ | COCO 2017 detection (`mini_coco_det`) | annotations CC-BY 4.0 (COCO Consortium); images under their Flickr terms |
| imagenette_160/ | Imagenette 160 px (`imagenette_160`) | Apache-2.0 (fast.ai Imagenette); images from ImageNet |
| mnist/ | MNIST idx files (`mnist`) | CC BY-SA 3.0 (Y. LeCun and C. Cortes) |

## Files
{files}
"""


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--src', required=True, help='folder holding mini_voc_seg, mini_coco_det, '
                      'imagenette_160 and mnist')
  parser.add_argument('--out', default=str(pathlib.Path(__file__).parent / 'sample'))
  args = parser.parse_args(argv)
  src, out = pathlib.Path(args.src).expanduser().resolve(), pathlib.Path(args.out)
  for name in ('mini_voc_seg', 'mini_coco_det', 'imagenette_160', 'mnist'):
    if not (src / name).is_dir():
      raise FileNotFoundError(f'{src / name} not found; --src must hold mini_voc_seg, '
                              'mini_coco_det, imagenette_160 and mnist')
    shutil.rmtree(out / name, ignore_errors=True)
  made = {'mini_voc_seg': make_voc(src / 'mini_voc_seg', out / 'mini_voc_seg'),
          'mini_coco_det': make_coco(src / 'mini_coco_det', out / 'mini_coco_det'),
          'imagenette_160': make_imagenette(src / 'imagenette_160', out / 'imagenette_160'),
          'mnist': make_mnist(src / 'mnist', out / 'mnist')}
  files = '\n'.join(f'- {name}/{split}: {", ".join(items)}'
                    for name, splits in made.items() for split, items in splits.items())
  (out / 'README.md').write_text(_README.format(
      src=args.src, short=SHORT_SIDE, quality=JPEG_QUALITY, counts=COUNTS, inet=IMAGENETTE_PER_CLASS,
      mnist=MNIST_COUNTS, files=files))
  size = sum(p.stat().st_size for p in out.rglob('*') if p.is_file())
  print(f'wrote {out} ({size / 2**20:.1f} MB)')


if __name__ == '__main__':
  main()
