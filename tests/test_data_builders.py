"""TFDS builders: the real mini sets, both VOC / COCO layouts, bad inputs, caching."""
import gzip
import hashlib
import json
import logging
import pathlib
import shutil

import numpy as np
from PIL import Image
import pytest

from clflax.data import builder_util
from clflax.data import coco_det
from clflax.data import imagenette
from clflax.data import mnist
from clflax.data import voc_seg


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  # One cache for the whole session: other modules reuse what is prepared here.
  return str(tmp_path_factory.getbasetemp() / 'clflax_data_cache')


@pytest.fixture(scope='module')
def voc(shared_data, cache):
  return voc_seg.load(shared_data / 'mini_voc_seg', cache_dir=cache)


@pytest.fixture(scope='module')
def coco(shared_data, cache):
  return coco_det.load(shared_data / 'mini_coco_det', cache_dir=cache)


def _records(source):
  return [source[i] for i in range(len(source))]


def test_voc_mini_counts_masks_match_the_palette_pngs(voc, shared_data):
  assert {k: len(v) for k, v in voc.items()} == {'train': 240, 'val': 60}
  seen = set()
  for ex in _records(voc['val']):
    key = ex['id'].decode()
    reference = np.asarray(Image.open(shared_data / 'mini_voc_seg' / 'val' / f'{key}.png'))
    np.testing.assert_array_equal(ex['mask'][..., 0], reference)
    assert ex['image'].shape[:2] == reference.shape and ex['image'].shape[2] == 3
    seen |= set(np.unique(reference).tolist())
  assert seen <= set(range(21)) | {255}
  assert len(seen) > 10 and 255 in seen  # Many classes and void, not binary masks.


def _coco_reference(folder: pathlib.Path):
  """file name -> sorted (class name, (ymin, xmin, ymax, xmax) clipped, crowd), from the JSON."""
  data = json.loads((folder / 'labels.json').read_text())
  names = {c['id']: c['name'] for c in data['categories']}
  images = {im['id']: im for im in data['images']}
  out = {im['file_name']: [] for im in data['images']}
  for a in data['annotations']:
    im = images[a['image_id']]
    x, y, w, h = a['bbox']
    box = (max(y, 0), max(x, 0), min(y + h, im['height']), min(x + w, im['width']))
    out[im['file_name']].append((names[a['category_id']], box, bool(a['iscrowd'])))
  return {k: sorted(v) for k, v in out.items()}


def test_coco_mini_classes_mapped_by_name_boxes_converted(coco, shared_data):
  assert {k: len(v) for k, v in coco.items()} == {'train': 240, 'val': 60}
  backpack = {}
  for split in ('train', 'val'):
    reference = _coco_reference(shared_data / 'mini_coco_det' / split)
    crowd = 0
    for ex in _records(coco[split]):
      h, w = ex['image'].shape[:2]
      boxes = ex['boxes']
      assert (boxes >= 0).all() and (boxes[:, 2] <= h).all() and (boxes[:, 3] <= w).all()
      got = sorted((coco_det.COCO_CLASSES[c], tuple(b), bool(k))
                   for c, b, k in zip(ex['classes'], boxes.tolist(), ex['is_crowd']))
      want = reference[ex['file_name'].decode()]
      assert [g[0] for g in got] == [r[0] for r in want]
      np.testing.assert_allclose([g[1] for g in got], [r[1] for r in want], atol=1e-3)
      crowd += int(ex['is_crowd'].sum())
      backpack.setdefault(split, set()).update(
          int(c) for c in ex['classes'] if coco_det.COCO_CLASSES[c] == 'backpack')
    assert crowd == sum(k for v in reference.values() for _, _, k in v)
    assert coco[split].dataset_info.metadata['num_crowd'][split] == crowd
  # The JSON ids of 'backpack' differ between the splits; the class index does not.
  assert backpack == {'train': {24}, 'val': {24}}
  ids = {s: {c['name']: c['id'] for c in json.loads(
      (shared_data / 'mini_coco_det' / s / 'labels.json').read_text())['categories']}
         for s in ('train', 'val')}
  assert ids['train']['backpack'] != ids['val']['backpack']


def test_coco_classes_are_the_80_standard_names():
  assert len(coco_det.COCO_CLASSES) == len(set(coco_det.COCO_CLASSES)) == 80
  assert len(coco_det.COCO_CATEGORY_IDS) == 80 and coco_det.COCO_CATEGORY_IDS[-1] == 90
  assert coco_det.COCO_CLASSES[0] == 'person' and coco_det.COCO_CLASSES[-1] == 'toothbrush'
  assert coco_det.class_index('tvmonitor') == coco_det.COCO_CLASSES.index('tv')


def test_imagenette_mini_readable_names_and_folder_labels(shared_data, cache):
  ds = imagenette.load(shared_data / 'imagenette_160', cache_dir=cache)
  assert {k: len(v) for k, v in ds.items()} == {'train': 240, 'val': 60}
  names = ds['train'].dataset_info.features['label'].names
  assert names[0] == 'tench' and names[-1] == 'parachute' and len(names) == 10
  folders = sorted(p.name for p in (shared_data / 'imagenette_160' / 'train').iterdir())
  labels = []
  for ex in _records(ds['val']):
    labels.append(int(ex['label']))
    assert folders[labels[-1]] == ex['file_name'].decode().split('/')[0]
  assert np.bincount(labels).tolist() == [6] * 10


def test_mnist_idx_matches_published_checksum_and_builder(shared_data, cache):
  arrays = mnist.read_mnist(shared_data / 'mnist')
  (x, y), (tx, ty) = arrays['train'], arrays['test']
  assert x.shape == (60000, 28, 28) and tx.shape == (10000, 28, 28) and x.dtype == np.uint8
  header = np.array([0x803, 60000, 28, 28], '>u4').tobytes()
  assert hashlib.md5(header + x.tobytes()).hexdigest() == '6bbc9ace898e44ae57da46a324031adb'
  assert y[:5].tolist() == [5, 0, 4, 1, 9] and np.bincount(ty).sum() == 10000
  ds = mnist.load(shared_data / 'mnist', cache_dir=cache)
  bx, by = mnist.to_arrays(ds['train'])
  np.testing.assert_array_equal(bx, x)
  np.testing.assert_array_equal(by, y)
  assert len(mnist.to_arrays(ds['test'])[0]) == 10000


def _copy_voc_pairs(src: pathlib.Path, keys, image_dir, mask_dir):
  image_dir.mkdir(parents=True, exist_ok=True)
  mask_dir.mkdir(parents=True, exist_ok=True)
  for key in keys:
    shutil.copy(src / f'{key}.jpg', image_dir)
    shutil.copy(src / f'{key}.png', mask_dir)


def test_vocdevkit_layout(shared_data, tmp_path):
  mini = shared_data / 'mini_voc_seg'
  root = tmp_path / 'VOCdevkit' / 'VOC2012'
  keys = {s: sorted(p.stem for p in (mini / s).glob('*.jpg'))[:n] for s, n in (('train', 3),
                                                                                 ('val', 2))}
  (root / 'ImageSets' / 'Segmentation').mkdir(parents=True)
  for split, ks in keys.items():
    _copy_voc_pairs(mini / split, ks, root / 'JPEGImages', root / 'SegmentationClass')
    (root / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text('\n'.join(ks) + '\n')
  ds = voc_seg.load(tmp_path, cache_dir=str(tmp_path / 'cache'))  # The folder above VOCdevkit.
  for split, ks in keys.items():
    assert sorted(ex['id'].decode() for ex in _records(ds[split])) == ks
    ex = ds[split][0]
    reference = np.asarray(Image.open(root / 'SegmentationClass' / f'{ex["id"].decode()}.png'))
    np.testing.assert_array_equal(ex['mask'][..., 0], reference)


def _official_coco(shared_data, root: pathlib.Path):
  """Official layout from mini files: official category ids, plus one image without boxes."""
  official_id = dict(zip(coco_det.COCO_CLASSES, coco_det.COCO_CATEGORY_IDS))
  (root / 'annotations').mkdir(parents=True)
  for split, n in (('train', 3), ('val', 2)):
    data = json.loads((shared_data / 'mini_coco_det' / split / 'labels.json').read_text())
    names = {c['id']: c['name'] for c in data['categories']}
    images = data['images'][:n + 1]
    keep = {im['id'] for im in images[:n]}
    anns = [dict(a, category_id=official_id[names[a['category_id']]])
            for a in data['annotations'] if a['image_id'] in keep]
    (root / f'{split}2017').mkdir()
    for im in images:
      shutil.copy(shared_data / 'mini_coco_det' / split / 'data' / im['file_name'],
                  root / f'{split}2017')
    cats = [{'id': i, 'name': c} for c, i in official_id.items()]
    (root / 'annotations' / f'instances_{split}2017.json').write_text(json.dumps(
        {'images': images, 'annotations': anns, 'categories': cats}))
  return root


def test_official_coco_layout_keeps_images_without_boxes(shared_data, tmp_path):
  root = _official_coco(shared_data, tmp_path / 'coco')
  ds = coco_det.load(root, cache_dir=str(tmp_path / 'cache'))
  assert {k: len(v) for k, v in ds.items()} == {'train': 4, 'val': 3}
  for split in ('train', 'val'):
    data = json.loads((root / 'annotations' / f'instances_{split}2017.json').read_text())
    counts = {im['file_name']: sum(a['image_id'] == im['id'] for a in data['annotations'])
              for im in data['images']}
    by_id = {c['id']: c['name'] for c in data['categories']}
    for ex in _records(ds[split]):
      assert len(ex['classes']) == counts[ex['file_name'].decode()]
      want = sorted(by_id[a['category_id']] for a in data['annotations']
                    if a['image_id'] == ex['image_id'])
      assert sorted(coco_det.COCO_CLASSES[c] for c in ex['classes']) == want
    assert 0 in counts.values()


def _mini_coco_copy(shared_data, root: pathlib.Path, n: int = 3):
  for split in ('train', 'val'):
    data = json.loads((shared_data / 'mini_coco_det' / split / 'labels.json').read_text())
    images = data['images'][:n]
    ids = {im['id'] for im in images}
    data = dict(data, images=images, annotations=[a for a in data['annotations']
                                                   if a['image_id'] in ids])
    (root / split / 'data').mkdir(parents=True)
    for im in images:
      shutil.copy(shared_data / 'mini_coco_det' / split / 'data' / im['file_name'],
                  root / split / 'data')
    (root / split / 'labels.json').write_text(json.dumps(data))
  return root


def test_malformed_json_is_an_error_naming_the_file(shared_data, tmp_path):
  root = _mini_coco_copy(shared_data, tmp_path / 'coco')
  (root / 'val' / 'labels.json').write_text('{"images": [')
  for skip_bad in (False, True):
    with pytest.raises(ValueError, match=r'val/labels\.json: malformed COCO JSON'):
      coco_det.load(root, cache_dir=str(tmp_path / 'cache'), skip_bad=skip_bad)


def test_bad_annotation_error_or_counted_skip(shared_data, tmp_path, caplog):
  root = _mini_coco_copy(shared_data, tmp_path / 'coco')
  path = root / 'train' / 'labels.json'
  data = json.loads(path.read_text())
  data['annotations'][0]['bbox'][2] = -5.
  bad_id = data['annotations'][0]['id']
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=rf'labels\.json annotation {bad_id} \(bbox .* has no area'):
    coco_det.load(root, cache_dir=str(tmp_path / 'cache'))
  with caplog.at_level(logging.WARNING):
    ds = coco_det.load(root, cache_dir=str(tmp_path / 'cache'), skip_bad=True)
  total = len(data['annotations'])
  assert sum(len(ds['train'][i]['classes']) for i in range(3)) == total - 1
  assert f'skipped 1 of {total} annotations: labels.json annotation {bad_id}' in caplog.text


def test_truncated_image_error_or_counted_skip_and_strict_reuse_refused(shared_data, tmp_path,
                                                                       caplog):
  mini = shared_data / 'mini_voc_seg'
  for split in ('train', 'val'):
    keys = sorted(p.stem for p in (mini / split).glob('*.jpg'))[:3]
    _copy_voc_pairs(mini / split, keys, tmp_path / 'voc' / split, tmp_path / 'voc' / split)
  bad = sorted((tmp_path / 'voc' / 'train').glob('*.jpg'))[1]
  bad.write_bytes(bad.read_bytes()[:2000])
  cache = str(tmp_path / 'cache')
  with pytest.raises(ValueError, match=rf'bad file {bad.name} \(truncated\)'):
    voc_seg.load(tmp_path / 'voc', cache_dir=cache)
  with caplog.at_level(logging.WARNING):
    ds = voc_seg.load(tmp_path / 'voc', cache_dir=cache, skip_bad=True)
  assert len(ds['train']) == 2 and len(ds['val']) == 3
  assert f'skipped 1 of 3 files: {bad.name} (truncated)' in caplog.text
  assert ds['train'].dataset_info.metadata['skipped']['train']['files'] == [f'{bad.name} (truncated)']
  with pytest.raises(ValueError, match='pass skip_bad=True to use it'):
    voc_seg.load(tmp_path / 'voc', cache_dir=cache)


@pytest.mark.parametrize('load', [voc_seg.load, coco_det.load, imagenette.load, mnist.load])
def test_missing_or_wrong_folder_one_line_error(load, tmp_path):
  with pytest.raises(FileNotFoundError, match='not found; expected') as missing:
    load(tmp_path / 'nowhere', cache_dir=str(tmp_path / 'cache'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='expected') as wrong:
    load(tmp_path / 'empty', cache_dir=str(tmp_path / 'cache'))
  assert '\n' not in str(missing.value) and '\n' not in str(wrong.value)


def test_cache_keyed_by_source_folder_and_reused(shared_data, tmp_path):
  # Two folders with the same name but different content never share prepared files.
  roots = []
  for parent, n in (('a', 2), ('b', 3)):
    root = tmp_path / parent / 'voc'
    for split in ('train', 'val'):
      keys = sorted(p.stem for p in (shared_data / 'mini_voc_seg' / split).glob('*.jpg'))[:n]
      _copy_voc_pairs(shared_data / 'mini_voc_seg' / split, keys, root / split, root / split)
    roots.append(root)
  cache = str(tmp_path / 'cache')
  assert len(voc_seg.load(roots[0], cache_dir=cache)['train']) == 2
  assert len(voc_seg.load(roots[1], cache_dir=cache)['train']) == 3
  assert builder_util.cache_path(cache, roots[0]) != builder_util.cache_path(cache, roots[1])
  builder = builder_util.prepare(voc_seg.VocSeg, roots[0], cache_dir=cache)
  files = sorted(pathlib.Path(builder.data_dir).glob('*.array_record*'))
  stamps = [f.stat().st_mtime_ns for f in files]
  assert len(voc_seg.load(roots[0], cache_dir=cache)['train']) == 2  # Reused, not rebuilt.
  assert [f.stat().st_mtime_ns for f in files] == stamps


def test_mnist_read_idx_rejects_bad_files(tmp_path):
  path = tmp_path / 'bad-idx1-ubyte.gz'
  path.write_bytes(gzip.compress(b'\x00\x00\x08\x01\x00\x00\x00\x05abc'))
  with pytest.raises(ValueError, match='3 data bytes, header'):
    mnist.read_idx(path)
  path.write_bytes(gzip.compress(b'PK\x03\x04'))
  with pytest.raises(ValueError, match='bad magic'):
    mnist.read_idx(path)
