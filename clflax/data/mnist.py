"""MNIST from the four standard idx files (gzipped or not) in a folder.

`read_idx` parses one idx file; `read_mnist` returns the arrays straight from the folder (what the
classic benchmarks use). The TFDS builder stores each split as records of CHUNK images: TFDS
spends ~0.2 ms per record, so 70,000 one-image records took ~13 s to prepare here against ~2 s
for 70 chunks; `to_arrays` reassembles them in the original order.
"""
import gzip
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from clflax.data import builder_util

FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
CHUNK = 1000
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
           0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


def find_file(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
  for name in (stem + '.gz', stem, stem.replace('-idx', '.idx')):
    if (folder / name).exists():
      return folder / name
  return None


def read_idx(path: str | pathlib.Path) -> np.ndarray:
  """Reads an idx file (magic 0x0000TTNN: type TT, NN dims; big-endian sizes; then the data)."""
  path = pathlib.Path(path)
  raw = gzip.decompress(path.read_bytes()) if path.suffix == '.gz' else path.read_bytes()
  if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _DTYPES:
    raise ValueError(f'{path}: not an idx file (bad magic number)')
  ndim = raw[3]
  shape = tuple(int(d) for d in np.frombuffer(raw, '>u4', ndim, offset=4))
  dtype = np.dtype(_DTYPES[raw[2]])
  size = int(np.prod(shape)) * dtype.itemsize
  offset = 4 + 4 * ndim
  if len(raw) - offset != size:
    raise ValueError(f'{path}: {len(raw) - offset} data bytes, header {shape} needs {size}')
  return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder('='))


def read_mnist(folder: str | pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train': (uint8 [60000, 28, 28], int32 [60000]), 'test': (...)} from the idx files."""
  folder = pathlib.Path(folder).expanduser()
  Mnist.check_layout(folder)
  out = {}
  for split, (image_stem, label_stem) in FILES.items():
    images = read_idx(find_file(folder, image_stem))
    labels = read_idx(find_file(folder, label_stem)).astype(np.int32)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
      raise ValueError(f'{folder}: {split} images {images.shape} and labels {labels.shape} differ')
    out[split] = (images, labels)
  return out


class Mnist(builder_util.SourceFolderBuilder, skip_registration=True):
  """MNIST digits; each record holds up to CHUNK consecutive images and their `start` index."""

  name = 'clflax_mnist'
  VERSION = tfds.core.Version('1.0.0')
  LAYOUT = ('train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, '
            't10k-labels-idx1-ubyte (optionally .gz)')

  @classmethod
  def check_layout(cls, source_dir):
    if not source_dir.is_dir():
      raise FileNotFoundError(f'{cls.name}: source folder {source_dir} not found; '
                              f'expected {cls.LAYOUT}')
    for stems in FILES.values():
      for stem in stems:
        if find_file(source_dir, stem) is None:
          raise cls.layout_error(source_dir, f'{stem}[.gz] missing')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            'images': tfds.features.Tensor(shape=(None, 28, 28), dtype=np.uint8,
                                           encoding=tfds.features.Encoding.BYTES),
            'labels': tfds.features.Tensor(shape=(None,), dtype=np.int64),
            'start': np.int64,
        }),
        metadata=self._metadata(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    arrays = read_mnist(self._source_dir)
    return {split: self._generate_examples(split, *arrays[split]) for split in FILES}

  def _generate_examples(self, split, images, labels):
    self.count_candidates(split, 'images', len(images))
    self.info.metadata.setdefault('num_images', {})[split] = len(images)
    for start in range(0, len(images), CHUNK):
      yield start, {'images': images[start:start + CHUNK],
                    'labels': labels[start:start + CHUNK].astype(np.int64),
                    'start': start}


def to_arrays(source) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [N, 28, 28], int32 [N]) in the original idx order from a chunked data source."""
  chunks = sorted((source[i] for i in range(len(source))), key=lambda c: int(c['start']))
  return (np.concatenate([c['images'] for c in chunks]),
          np.concatenate([c['labels'] for c in chunks]).astype(np.int32))


def load(source_dir, *, cache_dir=None, skip_bad=False):
  """Prepares (once) and returns {'train', 'test'} chunked data sources of MNIST."""
  return builder_util.prepare(Mnist, source_dir, cache_dir=cache_dir,
                              skip_bad=skip_bad).as_data_source()
