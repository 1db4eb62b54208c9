"""Workdir files on any filesystem etils.epath (and so Orbax) supports: local folders, gs://, s3://, ...

Local paths keep their POSIX guarantees (an atomic, fsync'ed rename for reports; an OS lock); object stores get
the closest they offer (a write to a temporary object, then a rename).
"""
import os
import tempfile
import uuid

from etils import epath


def is_local(path) -> bool:
  """Whether `path` is on a local (POSIX) filesystem rather than a URI such as gs://bucket/run."""
  return '://' not in os.fspath(path)


def makedirs(path) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path) -> bool:
  return epath.Path(path).exists()


def read_text(path) -> str:
  return epath.Path(path).read_text(encoding='utf-8')


def write_bytes(path, data: bytes) -> None:
  """`data` into `path` (its folder made first)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def write_text_atomically(path, text: str) -> str:
  """Writes a temporary file beside `path`, then renames it: readers never see a half-written file."""
  if not is_local(path):
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f'.{target.name}.{uuid.uuid4().hex}.tmp'
    tmp.write_text(text, encoding='utf-8')
    tmp.replace(target)
    return os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path
