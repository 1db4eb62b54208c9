"""The real sample bundled in the package: layouts, coverage, provenance, batches, trainer data."""
import json
import pathlib

import ml_collections
import numpy as np
from PIL import Image
import pytest

from clflax.data import coco_det
from tools import make_sample
from clflax.data import pipeline
from clflax.data import sources

SAMPLE = pathlib.Path(sources.default_data_dir())


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.getbasetemp() / 'clflax_data_cache')


def _config(cache_dir):
  """The config fields trainer_data reads, with tiny sizes."""
  c = ml_collections.ConfigDict()
  c.seed, c.tasks, c.data_dir = 0, ('seg', 'det', 'cls'), ''
  c.data = ml_collections.ConfigDict(dict(
      voc_seg='mini_voc_seg', coco_det='mini_coco_det', imagenette='imagenette_160',
      mnist='mnist', cache_dir=cache_dir, skip_bad=False, max_boxes=8, augment=True))
  c.model = ml_collections.ConfigDict(dict(image_size=32))
  c.train = ml_collections.ConfigDict(dict(batch_size=4, eval_batch_size=6, steps_per_epoch=3))
  c.eval = ml_collections.ConfigDict(dict(max_examples=0))
  c.strategy = ml_collections.ConfigDict(dict(agem=dict(memory_per_task=12),
                                              ewc=dict(fisher_samples=5)))
  return c


def test_sample_is_the_default_and_covers_several_classes():
  assert SAMPLE.is_dir() and sources.task_folder('seg') == SAMPLE / 'mini_voc_seg'
  size = sum(p.stat().st_size for p in SAMPLE.rglob('*') if p.is_file())
  assert size < 4 * 2**20
  voc = {s: set() for s in ('train', 'val')}
  for split in voc:
    for png in (SAMPLE / 'mini_voc_seg' / split).glob('*.png'):
      with Image.open(png) as m:
        assert m.mode == 'P' and m.size == Image.open(png.with_suffix('.jpg')).size
        voc[split] |= set(np.unique(np.asarray(m)).tolist()) - {0, 255}
  assert len(voc['train']) >= 10 and len(voc['val']) >= 5
  for split in ('train', 'val'):
    data = json.loads((SAMPLE / 'mini_coco_det' / split / 'labels.json').read_text())
    names = {c['id']: c['name'] for c in data['categories']}
    assert len({names[a['category_id']] for a in data['annotations']}) >= 10
    for folder in (SAMPLE / 'imagenette_160' / split).iterdir():
      assert any(folder.glob('*.JPEG'))
  assert len(list((SAMPLE / 'imagenette_160' / 'val').iterdir())) == 10
  readme = (SAMPLE / 'README.md').read_text()
  for words in ('make_sample', 'CC-BY 4.0', 'Apache-2.0', 'Flickr', 'JPEG quality 85'):
    assert words in readme


def test_make_sample_reproduces_the_shipped_files(shared_data, tmp_path):
  make_sample.main(['--src', str(shared_data), '--out', str(tmp_path)])
  made = {p.relative_to(tmp_path) for p in tmp_path.rglob('*') if p.is_file()}
  shipped = {p.relative_to(SAMPLE) for p in SAMPLE.rglob('*') if p.is_file()}
  assert made == shipped
  for rel in sorted(made - {pathlib.Path('README.md')}):
    assert (tmp_path / rel).read_bytes() == (SAMPLE / rel).read_bytes(), rel


def test_sample_builds_with_the_same_builders(cache):
  counts = {'seg': (32, 8), 'det': (32, 8), 'cls': (40, 10), 'mnist': (2, 1)}  # mnist: chunks.
  for task, (n_train, n_eval) in counts.items():
    src = sources.load_task_source(task, '', None, cache_dir=cache)
    assert (len(src['train']), len(src[sources.eval_split(task)])) == (n_train, n_eval)
  det = sources.load_task_source('det', '', None, cache_dir=cache)['train']
  data = json.loads((SAMPLE / 'mini_coco_det' / 'train' / 'labels.json').read_text())
  stats = pipeline.det_target_stats(det, max_boxes=8)
  assert stats['num_crowd'] == sum(a['iscrowd'] for a in data['annotations'])
  per_image = [sum(a['image_id'] == im['id'] and not a['iscrowd'] for a in data['annotations'])
               for im in data['images']]
  assert stats['boxes_dropped'] == sum(max(0, n - 8) for n in per_image)
  assert all(c < len(coco_det.COCO_CLASSES) for i in range(len(det)) for c in det[i]['classes'])


def test_trainer_data_from_the_sample(cache):
  data = pipeline.trainer_data(_config(cache), process_index=0, process_count=1)
  assert 'sample' in data.description and '--config.data_dir' in data.description
  assert data.steps_per_epoch == {'seg': 3, 'det': 3, 'cls': 3}
  seg = data.train_sets['seg'][7]
  assert seg['image'].shape == (4, 32, 32, 3) and seg['mask'].shape == (4, 32, 32)
  assert set(np.unique(seg['mask']).tolist()) <= set(range(21)) | {255}
  det = data.eval_batches['det']
  assert len(det) == 2 and [int(b['valid'].sum()) for b in det] == [6, 2]
  boxes = np.concatenate([b['boxes'][b['box_valid']] for b in det])
  assert len(boxes) and (boxes >= 0).all() and (boxes <= 32).all()
  memory = data.memory_examples('cls', 12)
  assert memory['image'].shape == (12, 32, 32, 3)
  assert np.bincount(memory['label'], minlength=10).max() <= 2  # Class-balanced.
  assert data.example_batches['cls']['label'].shape == (4,)


def test_describe_data_names_the_full_data_dir():
  line = sources.describe_data('/data/full', {'voc_seg': 'VOCdevkit'})
  assert line.startswith('/data/full') and 'seg=VOCdevkit' in line and 'det=mini_coco_det' in line
  with pytest.raises(ValueError, match="unknown task 'depth'"):
    sources.task_folder('depth')
