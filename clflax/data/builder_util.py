"""Shared machinery of the clflax TFDS builders: source-folder base class, cache keys, file checks.

Every builder reads a local source folder (nothing is downloaded), writes `array_record` files under
`<cache_dir>/<folder name>-<hash of its absolute path>/<builder name>/<version>` and is read back with
`builder.as_data_source()`, which needs no TensorFlow. Bad inputs (a corrupt image, a bad annotation)
raise a ValueError naming the file, or with `skip_bad=True` are skipped, counted, stored in the
dataset's metadata (`info.metadata['skipped']`) and logged as one line at the end.
"""
import contextlib
import hashlib
import io
import pathlib
import time
from typing import Any, ClassVar

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

DEFAULT_CACHE_DIR = '~/tensorflow_datasets/clflax'
_MAX_LISTED = 10  # Skipped files named in the log line; the metadata keeps them all.


class BadInputError(ValueError):
  """A corrupt file or a bad annotation; the message is '<name> (<reason>)'."""


def cache_path(cache_dir: str | None, source_dir: pathlib.Path) -> pathlib.Path:
  """Where a source folder's prepared files live: distinct folders never share a path."""
  root = pathlib.Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
  digest = hashlib.sha1(str(source_dir).encode()).hexdigest()[:10]
  return root / f'{source_dir.name}-{digest}'


def _reason(err: Exception) -> str:
  if isinstance(err, FileNotFoundError):
    return 'missing'
  text = str(err).splitlines()[0] if str(err) else type(err).__name__
  return 'truncated' if 'truncated' in text.lower() else text


def read_image(path: pathlib.Path) -> tuple[bytes, tuple[int, int]]:
  """Returns the encoded bytes of an RGB or grey image file and its (height, width).

  The image is fully decoded once so that truncated or corrupt files are found at prepare time, not
  mid-training. Images in other modes (CMYK, palette, RGBA) are re-encoded as RGB JPEG.
  """
  try:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      if img.mode not in ('RGB', 'L'):
        out = io.BytesIO()
        img.convert('RGB').save(out, format='JPEG', quality=95)
        data = out.getvalue()
      return data, (img.height, img.width)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
    raise BadInputError(f'{path.name} ({_reason(err)})') from err


def read_label_png(path: pathlib.Path) -> tuple[bytes, np.ndarray]:
  """Returns the bytes and the index array of a palette ('P') or grey ('L') label PNG."""
  try:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      if img.mode not in ('P', 'L'):
        raise BadInputError(f'{path.name} (mode {img.mode}: expected palette indices, not colours)')
      return data, np.asarray(img)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
    if isinstance(err, BadInputError):
      raise
    raise BadInputError(f'{path.name} ({_reason(err)})') from err


def skip_summary(metadata: dict[str, Any], split: str) -> str | None:
  """'skipped 2 of 240 files: a.jpg (truncated), ...' for one split, or None without skips."""
  skipped = metadata.get('skipped', {}).get(split, {})
  parts = []
  for kind, items in skipped.items():
    if not items:
      continue
    total = metadata.get('candidates', {}).get(split, {}).get(kind, len(items))
    listed = ', '.join(items[:_MAX_LISTED]) + (', ...' if len(items) > _MAX_LISTED else '')
    parts.append(f'skipped {len(items)} of {total} {kind}: {listed}')
  return '; '.join(parts) or None


class SourceFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder whose input is a local folder; subclasses set LAYOUT and check_layout."""

  LAYOUT: ClassVar[str] = ''  # One line: what the source folder must hold.

  def __init__(self, *, source_dir: str | pathlib.Path, skip_bad: bool = False, **kwargs):
    self._source_dir = pathlib.Path(source_dir)
    self._skip_bad = skip_bad
    super().__init__(**kwargs)

  @classmethod
  def check_layout(cls, source_dir: pathlib.Path) -> None:
    """Raises FileNotFoundError (one line, saying what was expected) for a wrong layout."""
    raise NotImplementedError

  @classmethod
  def layout_error(cls, source_dir: pathlib.Path, problem: str) -> FileNotFoundError:
    return FileNotFoundError(f'{cls.name}: {problem} in {source_dir}; expected {cls.LAYOUT}')

  def _metadata(self):
    return tfds.core.MetadataDict(skipped={}, candidates={})

  def bad_input(self, split: str, kind: str, err: BadInputError) -> None:
    """Raises err as a one-line error, or records it as a skip when skip_bad is set."""
    if not self._skip_bad:
      raise ValueError(f'{self.name} {split}: bad {kind[:-1]} {err} in {self._source_dir}; '
                       'fix it or pass skip_bad=True to skip and count bad inputs') from err
    self.info.metadata['skipped'].setdefault(split, {}).setdefault(kind, []).append(str(err))

  def count_candidates(self, split: str, kind: str, n: int) -> None:
    self.info.metadata['candidates'].setdefault(split, {})[kind] = n


def prepare(builder_cls: type[SourceFolderBuilder], source_dir: str | pathlib.Path, *,
            cache_dir: str | None = None, skip_bad: bool = False) -> SourceFolderBuilder:
  """Prepares (or reuses) the dataset of `source_dir` and returns its builder.

  A copy prepared earlier with skips is refused when `skip_bad` is False, so a strict run never
  silently trains on a subset.
  """
  source = pathlib.Path(source_dir).expanduser().resolve()
  if not source.is_dir():
    raise FileNotFoundError(f'{builder_cls.name}: source folder {source} not found; '
                            f'expected {builder_cls.LAYOUT}')
  builder_cls.check_layout(source)
  builder = builder_cls(source_dir=source, skip_bad=skip_bad,
                        data_dir=cache_path(cache_dir, source), file_format='array_record')
  reused = (builder.data_path / 'dataset_info.json').exists()
  start = time.perf_counter()
  chatter = io.StringIO()  # TFDS prints its progress bars and banners: kept out of the run's console.
  with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  if chatter.getvalue().strip():
    logging.debug('%s: TFDS output while preparing:\n%s', builder.name, chatter.getvalue())
  splits = ' / '.join(f'{info.num_examples} {name}' for name, info in sorted(builder.info.splits.items(),
                                                                               key=lambda kv: kv[0] != 'train'))
  logging.info('%s: %s %s examples from %s in %.1f s (%s)', builder.name, 'reused' if reused else 'prepared',
               splits, source, time.perf_counter() - start, builder.data_dir)
  for split in builder.info.splits:
    summary = skip_summary(builder.info.metadata, split)
    if summary and not skip_bad:
      raise ValueError(f'{builder.name} {split}: the copy prepared at {builder.data_dir} {summary}; '
                       'pass skip_bad=True to use it, or fix the files and delete that folder')
    if summary:
      logging.warning('%s %s: %s', builder.name, split, summary)
  return builder
