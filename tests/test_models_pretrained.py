"""Torch-file reader (legacy + zip), weight import errors, and the ImageNet check on Imagenette."""
import collections
import hashlib
import pickle
import zipfile

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from clflax.models import multitask
from clflax.models import pretrained as P

LITE0_SHA256 = '579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db'


# --- A minimal torch zip-format writer (what torch.save writes), built without torch. ---

class _Global:
  """Pickled as the GLOBAL opcode `module.name`, like torch's classes and functions."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # Pickle insists that a reduce function is callable.
    raise NotImplementedError


class _Storage:
  def __init__(self, key, array):
    self.key, self.array = key, array


class _Tensor:
  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

  def __reduce__(self):
    return _Global('torch._utils', '_rebuild_tensor_v2'), self.args


class _TorchPickler(pickle._Pickler):  # The pure-Python pickler lets us add a dispatch entry.
  dispatch = dict(pickle._Pickler.dispatch)
  dispatch[_Global] = lambda self, g: self.write(pickle.GLOBAL + f'{g.module}\n{g.name}\n'.encode())

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      kind = {np.float32: 'FloatStorage', np.int64: 'LongStorage', np.float64: 'DoubleStorage'}
      return ('storage', _Global('torch', kind[obj.array.dtype.type]), obj.key, 'cpu', obj.array.size)
    return None


def write_torch_zip(path, state, root='archive'):
  """`state`: name -> np.ndarray (own contiguous storage) or a ready `_Tensor`."""
  storages, obj = {}, collections.OrderedDict()
  for name, value in state.items():
    if isinstance(value, np.ndarray):
      st = _Storage(str(len(storages)), np.ascontiguousarray(value).ravel())
      value = _Tensor(st, 0, value.shape, [int(np.prod(value.shape[i + 1:])) for i in range(value.ndim)])
    storages[value.args[0].key] = value.args[0]
    obj[name] = value
  with open(path, 'wb') as f, zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED) as zf:
    with zf.open(f'{root}/data.pkl', 'w') as pf:
      _TorchPickler(pf, protocol=2).dump(obj)
    zf.writestr(f'{root}/byteorder', 'little')
    zf.writestr(f'{root}/version', '3\n')
    for key, st in storages.items():
      zf.writestr(f'{root}/data/{key}', st.array.astype(st.array.dtype.newbyteorder('<')).tobytes())


@pytest.fixture(scope='module')
def lite0_state():
  return P.read_torch_file(P.default_weights_path())


def test_read_legacy_lite0_file(lite0_state):
  with open(P.default_weights_path(), 'rb') as f:
    assert hashlib.sha256(f.read()).hexdigest() == LITE0_SHA256
  sd = lite0_state
  assert len(sd) == 296
  assert sd['_conv_stem.weight'].shape == (32, 3, 3, 3) and sd['_conv_stem.weight'].dtype == np.float32
  assert sd['_blocks.15._depthwise_conv.weight'].shape == (1152, 1, 3, 3)
  assert sd['_fc.weight'].shape == (1000, 1280) and sd['_fc.bias'].shape == (1000,)
  assert sd['_bn0.num_batches_tracked'].shape == () and sd['_bn0.num_batches_tracked'].dtype == np.int64
  assert all(np.all(v >= 0) for k, v in sd.items() if k.endswith('running_var'))
  assert all(np.all(np.isfinite(v)) for v in sd.values())
  weights = [v for k, v in sd.items() if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
  assert sum(v.size for v in weights) == 4_652_008  # Published EfficientNet-Lite0 size.


def test_read_zip_format_with_views_and_dtypes(tmp_path):
  rng = np.random.default_rng(0)
  base = rng.normal(size=30).astype(np.float32)
  shared = _Storage('shared', base)
  state = {
      'conv.weight': rng.normal(size=(4, 3, 2, 2)).astype(np.float32),
      'steps': np.array(7, np.int64),
      'double': rng.normal(size=(5,)),
      # Two views of one storage: a [4, 5] block at offset 2 and its transpose.
      'block': _Tensor(shared, 2, (4, 5), (5, 1)),
      'block_t': _Tensor(shared, 2, (5, 4), (1, 5)),
  }
  path = tmp_path / 'model.pt'
  write_torch_zip(path, state, root='some_model')
  got = P.read_torch_file(path)
  assert set(got) == set(state)
  np.testing.assert_array_equal(got['conv.weight'], state['conv.weight'])
  assert got['steps'].dtype == np.int64 and got['steps'] == 7
  assert got['double'].dtype == np.float64
  np.testing.assert_array_equal(got['double'], state['double'])
  np.testing.assert_array_equal(got['block'], base[2:22].reshape(4, 5))
  np.testing.assert_array_equal(got['block_t'], base[2:22].reshape(4, 5).T)


def test_reader_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere.pth'):
    P.read_torch_file(tmp_path / 'nowhere.pth')
  text = tmp_path / 'notes.pth'
  text.write_text('these are not weights\n')
  with pytest.raises(ValueError, match='not a torch checkpoint'):
    P.read_torch_file(text)
  not_torch = tmp_path / 'other.zip'
  with zipfile.ZipFile(not_torch, 'w') as zf:
    zf.writestr('readme.txt', 'hi')
  with pytest.raises(ValueError, match='no data.pkl'):
    P.read_torch_file(not_torch)
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes(open(P.default_weights_path(), 'rb').read()[:5_000_000])
  with pytest.raises(ValueError, match='truncated'):
    P.read_torch_file(truncated)
  # A pickle that would call os.system is refused, not run.
  evil = tmp_path / 'evil.pt'
  with zipfile.ZipFile(evil, 'w') as zf:
    zf.writestr('archive/data.pkl', b'\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.')
  with pytest.raises(pickle.UnpicklingError, match='unsupported global os.system'):
    P.read_torch_file(evil)


def test_convert_errors_name_the_problem(lite0_state):
  lite0 = P.efficientnet.EfficientNet('lite0')
  missing = {k: v for k, v in lite0_state.items() if k != '_blocks.3._bn2.running_mean'}
  with pytest.raises(ValueError, match=r"missing key '_blocks\.3\._bn2\.running_mean'"):
    P.convert_state_dict(missing, lite0)
  wrong = dict(lite0_state, **{'_conv_head.weight': np.zeros((1280, 328, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"shape mismatch for '_conv_head\.weight'.*\(1280, 328, 1, 1\).*\(1, 1, 320, 1280\)"):
    P.convert_state_dict(wrong, lite0)
  # B0 has squeeze-excite: its weights do not fit Lite0, and Lite0's do not fit B0.
  b0_like = dict(lite0_state, **{'_blocks.0._se_reduce.weight': np.zeros((8, 32, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"unexpected key '_blocks\.0\._se_reduce\.weight'"):
    P.convert_state_dict(b0_like, lite0)
  with pytest.raises(ValueError, match=r"missing key '_blocks\.0\._se_"):
    P.convert_state_dict(lite0_state, P.efficientnet.EfficientNet('b0'))
  with pytest.raises(FileNotFoundError, match='b0'):
    P.backbone_variables('b0')
  with pytest.raises(FileNotFoundError, match='missing.pth'):
    P.load_imagenet_classifier('lite0', path='/nonexistent/missing.pth')


def test_backbone_variables_follow_the_file_layout(lite0_state):
  v = P.backbone_variables('lite0')
  assert 'classifier' not in v['params']
  sd = lite0_state
  np.testing.assert_array_equal(v['params']['stem_conv']['kernel'][1, 2, 0, 5], sd['_conv_stem.weight'][5, 0, 1, 2])
  dw = sd['_blocks.4._depthwise_conv.weight']  # (C, 1, 5, 5)
  assert dw.shape == (240, 1, 5, 5)
  np.testing.assert_array_equal(v['params']['blocks_4']['depthwise_conv']['kernel'][4, 1, 0, :], dw[:, 0, 4, 1])
  np.testing.assert_array_equal(v['params']['blocks_6']['project_bn']['scale'], sd['_blocks.6._bn2.weight'])
  np.testing.assert_array_equal(v['batch_stats']['head_bn']['var'], sd['_bn1.running_var'])
  np.testing.assert_array_equal(v['batch_stats']['blocks_6']['expand_bn']['mean'], sd['_blocks.6._bn0.running_mean'])


def _tiny_as_torch_state(variables):
  """The test's own Flax -> lukemelas naming and layouts, to write a tiny model as a torch file."""
  top = {'stem_conv': '_conv_stem', 'stem_bn': '_bn0', 'head_conv': '_conv_head', 'head_bn': '_bn1'}
  block = {'expand_conv': '_expand_conv', 'expand_bn': '_bn0', 'depthwise_conv': '_depthwise_conv',
           'depthwise_bn': '_bn1', 'se_reduce': '_se_reduce', 'se_expand': '_se_expand',
           'project_conv': '_project_conv', 'project_bn': '_bn2'}
  leaf = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
  state = {}
  for collection in ('params', 'batch_stats'):
    for path, x in traverse_util.flatten_dict(variables[collection]).items():
      x = np.asarray(x)
      if path[0].startswith('blocks_'):
        name = f'_blocks.{path[0][7:]}.{block[path[1]]}.{leaf[path[2]]}'
      else:
        name = f'{top[path[0]]}.{leaf[path[1]]}'
      state[name] = x.transpose(3, 2, 0, 1) if x.ndim == 4 else x
  state['_bn0.num_batches_tracked'] = np.array(3, np.int64)
  return state


def test_init_variables_overwrites_the_backbone_from_a_zip_file(tmp_path):
  model = multitask.MultiTaskNet('tiny', neck_channels=16)
  key = jax.random.PRNGKey(0)
  source = multitask.init_variables(model, jax.random.PRNGKey(7), 32)
  backbone = {c: source[c]['backbone'] for c in ('params', 'batch_stats')}
  backbone['batch_stats'] = jax.tree_util.tree_map(lambda x: x + 0.5, backbone['batch_stats'])
  path = tmp_path / 'tiny.pt'
  write_torch_zip(path, _tiny_as_torch_state(backbone))
  fresh = multitask.init_variables(model, key, 32)
  loaded = multitask.init_variables(model, key, 32, pretrained_path=str(path))
  for c in ('params', 'batch_stats'):
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded[c]['backbone'], backbone[c])
  for part in ('neck', 'seg_head', 'det_head', 'cls_head'):  # Heads keep their fresh init.
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded['params'][part], fresh['params'][part])
  assert not np.allclose(fresh['params']['backbone']['stem_conv']['kernel'], backbone['params']['stem_conv']['kernel'])


# WordNet folder -> ImageNet-1k class index.
IMAGENETTE = {'n01440764': 0, 'n02102040': 217, 'n02979186': 482, 'n03000684': 491, 'n03028079': 497,
              'n03394916': 566, 'n03417042': 569, 'n03425413': 571, 'n03445777': 574, 'n03888257': 701}


def _resize_center_crop(path, short=256, crop=224):
  im = Image.open(path).convert('RGB')
  w, h = im.size
  scale = short / min(w, h)
  im = im.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
  left, top = (im.size[0] - crop) // 2, (im.size[1] - crop) // 2
  return np.asarray(im.crop((left, top, left + crop, top + crop)))


@pytest.fixture
def optimized_compiles():
  """The 224 px forward over 300 images runs ~1.5x faster with XLA's optimisations on."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


def test_pretrained_lite0_classifies_imagenette(shared_data, optimized_compiles):
  root = shared_data / 'imagenette_160'
  images, labels = [], []
  for split in ('train', 'val'):
    for folder in sorted((root / split).iterdir()):
      for f in sorted(folder.glob('*.JPEG')):
        images.append(_resize_center_crop(f))
        labels.append(IMAGENETTE[folder.name])
  images, labels = np.stack(images), np.array(labels)
  assert images.shape == (300, 224, 224, 3)
  model, variables = P.load_imagenet_classifier('lite0')
  forward = jax.jit(lambda v, x: model.apply(v, P.preprocess(x, 'lite0'), train=False))
  logits = np.concatenate([np.asarray(forward(variables, images[i:i + 100])) for i in range(0, 300, 100)])
  assert logits.shape == (300, 1000)
  top1 = np.mean(logits.argmax(-1) == labels)
  classes = np.array(sorted(IMAGENETTE.values()))
  top1_10 = np.mean(classes[logits[:, classes].argmax(-1)] == labels)
  # The PyTorch reference on the same preprocessing: 0.77 and 0.99.
  assert top1 >= 0.75, top1
  assert top1_10 >= 0.97, top1_10


def test_imagenet_wnids_follow_the_class_indices():
  wnids = P.imagenet_wnids()
  assert len(wnids) == 1000 and len(set(wnids)) == 1000
  assert {w: wnids.index(w) for w in IMAGENETTE} == IMAGENETTE  # The published indices of the ten classes.


def test_cls_head_from_imagenet_rows_gives_the_classifier_logits_of_those_classes():
  wnids = ['n03888257', 'n01440764', 'n03445777']  # Any order: the head's class k is wnids[k].
  model = multitask.MultiTaskNet('lite0', num_cls_classes=3, neck_channels=8)
  variables = multitask.init_variables(model, jax.random.PRNGKey(0), 32, pretrained_path='default', cls_wnids=wnids)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  got = jax.jit(lambda v, x: model.apply(v, x, task='cls', train=False))(variables, images)  # (Eager: ~20 s.)
  classifier, full = P.load_imagenet_classifier('lite0')  # The independent path: the 1000-way model.
  logits = jax.jit(lambda v, x: classifier.apply(v, x, train=False))(full, P.preprocess(images, 'lite0'))
  np.testing.assert_allclose(got, np.asarray(logits)[:, [IMAGENETTE[w] for w in wnids]], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="'n99999999' is not an ImageNet WordNet id"):
    multitask.init_variables(model, jax.random.PRNGKey(0), 32, pretrained_path='default',
                             cls_wnids=['n99999999', 'n01440764', 'n03445777'])
  with pytest.raises(ValueError, match='3-way'):
    multitask.init_variables(model, jax.random.PRNGKey(0), 32, pretrained_path='default', cls_wnids=wnids[:2])
