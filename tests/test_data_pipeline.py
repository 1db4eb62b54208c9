"""grain pipelines on synthetic sources whose right answers are known by construction."""
import numpy as np
import pytest

from clflax.data import pipeline
from clflax.data import transforms

BOX = (20, 30, 60, 80)  # ymin, xmin, ymax, xmax of the bright object in the synthetic image.


def _cls_source(n, size=8):
  return [{'image': np.full((size, size, 3), i, np.uint8), 'label': i} for i in range(n)]


def _det_example():
  """Black 96x128 image; the object's left part is grey (120), its right part white (250)."""
  image = np.zeros((96, 128, 3), np.uint8)
  y0, x0, y1, x1 = BOX
  image[y0:y1, x0:55] = 120
  image[y0:y1, 55:x1] = 250
  return {'image': image, 'boxes': np.array([BOX], np.float32), 'classes': np.array([3]),
          'is_crowd': np.array([False]), 'image_id': 7}


def _labels(batches):
  return [int(v) for b in batches for v, ok in zip(b['label'], b['valid']) if ok]


def test_batches_have_fixed_shapes_and_dtypes():
  seg = [{'image': np.zeros((40, 50, 3), np.uint8), 'mask': np.full((40, 50), 255, np.uint8)}]
  det = [_det_example()]
  want = {
      'seg': {'image': ((2, 24, 24, 3), np.uint8), 'mask': ((2, 24, 24), np.int32),
              'valid': ((2,), bool)},
      'det': {'image': ((2, 24, 24, 3), np.uint8), 'boxes': ((2, 5, 4), np.float32),
              'classes': ((2, 5), np.int32), 'box_valid': ((2, 5), bool),
              'image_id': ((2,), np.int32), 'valid': ((2,), bool)},
      'cls': {'image': ((2, 24, 24, 3), np.uint8), 'label': ((2,), np.int32), 'valid': ((2,), bool)},
  }
  for task, source in (('seg', seg), ('det', det), ('cls', _cls_source(3))):
    kw = dict(image_size=24, batch_size=2, max_boxes=5, process_index=0, process_count=1)
    for batch in (pipeline.make_train_dataset(task, source, seed=0, **kw)[5],
                  pipeline.make_eval_batches(task, source, **kw)[0]):
      assert {k: (v.shape, v.dtype) for k, v in batch.items()} == want[task]
  with pytest.raises(ValueError, match="unknown task 'depth'"):
    pipeline.make_train_dataset('depth', seg, image_size=8, batch_size=1, seed=0)
  with pytest.raises(ValueError, match='batch_size must be a positive int, got 0'):
    pipeline.make_eval_batches('seg', seg, image_size=8, batch_size=0)


def test_same_seed_same_batches_other_seed_other_batches():
  def batches(seed, task, source):
    ds = pipeline.make_train_dataset(task, source, image_size=32, batch_size=4, seed=seed,
                                     process_index=0, process_count=1)
    return [ds[s] for s in (0, 3, 11)]
  for task, source in (('cls', _cls_source(20)), ('det', [_det_example()] * 5)):
    a, b, c = batches(0, task, source), batches(0, task, source), batches(1, task, source)
    for x, y in zip(a, b):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    key = 'label' if task == 'cls' else 'boxes'
    assert any(not np.array_equal(x[key], z[key]) for x, z in zip(a, c))


def test_each_epoch_is_a_new_permutation_indexed_by_global_step():
  ds = pipeline.make_train_dataset('cls', _cls_source(12), image_size=8, batch_size=4, seed=3,
                                   augment=False, process_index=0, process_count=1)
  epochs = [_labels(ds[s] for s in range(e * 3, e * 3 + 3)) for e in range(3)]
  for labels in epochs:
    assert sorted(labels) == list(range(12))
  assert epochs[0] != epochs[1] != epochs[2]
  assert epochs[0] != list(range(12))


def test_processes_split_each_global_batch_of_the_one_process_run():
  # Global batch 6 over 3 processes (2 each), augmentation on: process i's batch of step s is rows 2i..2i+1 of the
  # one-process run's batch s, image for image, so results do not depend on the number of processes.
  rng = np.random.default_rng(0)  # Textured images, so that a different crop or flip would show.
  source = [{'image': rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), 'label': i} for i in range(12)]
  one = pipeline.make_train_dataset('cls', source, image_size=8, batch_size=6, seed=0, process_index=0,
                                    process_count=1)
  parts = [pipeline.make_train_dataset('cls', source, image_size=8, batch_size=6, seed=0, process_index=i,
                                       process_count=3) for i in range(3)]
  for step in range(3):
    whole = one[step]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), whole[key])
  assert sorted(_labels(p[s] for p in parts for s in range(2))) == list(range(12))  # Epoch 1 covers the data.
  with pytest.raises(ValueError, match='does not split over 4 processes'):
    pipeline.make_train_dataset('cls', _cls_source(12), image_size=8, batch_size=6, seed=0, process_index=0,
                                process_count=4)


def test_eval_batches_padded_and_sharded_with_equal_batch_counts():
  batches = list(pipeline.make_eval_batches('cls', _cls_source(10), image_size=8, batch_size=4,
                                            process_index=0, process_count=1))
  assert [int(b['valid'].sum()) for b in batches] == [4, 4, 2]
  assert _labels(batches) == list(range(10))
  per_process = [list(pipeline.make_eval_batches('cls', _cls_source(10), image_size=8,
                                                 batch_size=4, process_index=i, process_count=2))
                 for i in range(2)]
  assert [len(p) for p in per_process] == [2, 2]
  assert [int(b['valid'].sum()) for b in per_process[0]] == [4, 1]
  assert sorted(_labels(per_process[0]) + _labels(per_process[1])) == list(range(10))
  assert not set(_labels(per_process[0])) & set(_labels(per_process[1]))
  capped = pipeline.make_eval_batches('cls', _cls_source(10), image_size=8, batch_size=4,
                                      max_examples=6, process_index=0, process_count=1)
  assert _labels(capped) == list(range(6))


def test_augmented_boxes_follow_the_cropped_and_flipped_image():
  ds = pipeline.make_train_dataset('det', [_det_example()] * 4, image_size=64, batch_size=4,
                                   seed=0, max_boxes=2, process_index=0, process_count=1)
  flips = set()
  yy, xx = np.mgrid[0:64, 0:64] + 0.5  # Pixel centres.
  for step in range(6):
    batch = ds[step]
    for image, box, ok in zip(batch['image'], batch['boxes'], batch['box_valid']):
      assert ok.tolist() == [True, False]
      y0, x0, y1, x1 = box[0]
      grey = image[..., 0].astype(float)
      inside = (yy > y0 + 2) & (yy < y1 - 2) & (xx > x0 + 2) & (xx < x1 - 2)
      outside = (yy < y0 - 2) | (yy > y1 + 2) | (xx < x0 - 2) | (xx > x1 + 2)
      assert inside.any() and grey[inside].min() > 90 and grey[outside].max() < 40
      # The white half is on the right unless the example was flipped.
      mid = (x0 + x1) / 2
      flips.add(bool(grey[inside & (xx < mid)].mean() > grey[inside & (xx > mid)].mean()))
  assert flips == {False, True}


def test_augmented_masks_follow_the_image_and_keep_class_values():
  image = np.zeros((80, 100, 3), np.uint8)
  mask = np.zeros((80, 100), np.uint8)
  mask[10:50, 20:70], image[10:50, 20:70] = 7, 255
  mask[50:52, 20:70] = 255  # A void strip.
  ds = pipeline.make_train_dataset('seg', [{'image': image, 'mask': mask}] * 2, image_size=48,
                                   batch_size=2, seed=1, process_index=0, process_count=1)
  for step in range(5):
    batch = ds[step]
    assert set(np.unique(batch['mask']).tolist()) <= {0, 7, 255}
    for img, m in zip(batch['image'][..., 0], batch['mask']):
      core = np.zeros_like(m, bool)  # Pixels 2 px away from any label change.
      core[2:-2, 2:-2] = True
      for dy, dx in ((2, 0), (-2, 0), (0, 2), (0, -2)):
        core &= np.roll(m, (dy, dx), (0, 1)) == m
      assert (img[core & (m == 7)] > 200).all() and (img[core & (m == 0)] < 55).all()


def test_crowd_boxes_dropped_and_largest_boxes_kept():
  sizes = np.arange(1, 41, dtype=np.float32)  # 40 boxes of distinct sizes; class = size.
  boxes = np.stack([np.zeros(40), np.zeros(40), sizes, sizes], -1).astype(np.float32)
  crowd = np.zeros(40, bool)
  crowd[39] = True  # The largest box is a crowd box: never a target.
  ex = {'image': np.zeros((64, 64, 3), np.uint8), 'boxes': boxes, 'classes': sizes.astype(int),
        'is_crowd': crowd, 'image_id': 1}
  batch = pipeline.make_eval_batches('det', [ex], image_size=64, batch_size=1, max_boxes=32,
                                     process_index=0, process_count=1)[0]
  kept = batch['classes'][0][batch['box_valid'][0]]
  assert sorted(kept.tolist()) == list(range(8, 40))  # The 32 largest non-crowd boxes.
  np.testing.assert_allclose(batch['boxes'][0][batch['box_valid'][0]][:, 2], kept)


def test_box_transform_against_hand_computed_values():
  crop = transforms.Crop(10., 20., 50., 100.)  # y0, x0, height, width.
  boxes = np.array([[20., 30., 40., 70.], [0., 0., 5., 5.], [50., 100., 70., 130.]], np.float32)
  out, keep = transforms.crop_resize_boxes(boxes, crop, 100, flip=False)
  np.testing.assert_allclose(out[0], [20., 10., 60., 50.])  # (y-10)*2, (x-20)*1.
  assert keep.tolist() == [True, False, True]  # Second box lies outside; third half inside.
  flipped, _ = transforms.crop_resize_boxes(boxes, crop, 100, flip=True)
  np.testing.assert_allclose(flipped[0], [20., 50., 60., 90.])


def test_iterate_matches_indexing():
  ds = pipeline.make_train_dataset('cls', _cls_source(10), image_size=8, batch_size=3, seed=0,
                                   process_index=0, process_count=1)
  for threads in (0, 2):  # Inline, and decoded ahead by background threads: the same batches in the same order.
    got = list(pipeline.iterate(ds, start_step=5, num_steps=3, num_threads=threads))
    assert [b['label'].tolist() for b in got] == [ds[s]['label'].tolist() for s in (5, 6, 7)]
  epochs = [[1, 2], [3, 4], [5, 6]]  # Any indexable set of batches (in-memory arrays) is read inline.
  assert list(pipeline.iterate(epochs, start_step=1, num_steps=2, num_threads=4)) == [[3, 4], [5, 6]]


def test_sample_examples_distinct_deterministic_and_class_balanced():
  source = [{'image': np.full((8, 8, 3), i, np.uint8), 'label': i % 5} for i in range(40)]
  a = pipeline.sample_examples('cls', source, 10, 0, 8, class_balanced=True)
  b = pipeline.sample_examples('cls', source, 10, 0, 8, class_balanced=True)
  np.testing.assert_array_equal(a['image'], b['image'])
  assert np.bincount(a['label']).tolist() == [2] * 5
  assert len(set(a['image'][:, 0, 0, 0].tolist())) == 10  # Distinct examples.
  assert a['image'].shape == (10, 8, 8, 3) and a['valid'].all()
  with pytest.raises(ValueError, match='cannot sample 41'):
    pipeline.sample_examples('cls', source, 41, 0, 8)


def test_unaugmented_classification_images_are_centre_cropped():
  # 80 x 120 image: columns index the x position, so the crop's x range is readable from the pixel values.
  image = np.broadcast_to((np.arange(120) * 2).astype(np.uint8)[None, :, None], (80, 120, 3)).copy()
  source = [{'image': image, 'label': 0}]
  batch = next(iter(pipeline.make_eval_batches('cls', source, image_size=35, batch_size=1)))
  side = 0.875 * 80  # The central 70 x 70 square: x in [25, 95), y in [5, 75).
  ref = np.asarray(transforms.open_image(image).resize((35, 35), transforms.Image.BILINEAR,
                                                       box=(25, 5, 25 + side, 5 + side)))
  np.testing.assert_allclose(batch['image'][0].astype(float), ref.astype(float), atol=2)
  assert 45 <= batch['image'][0, 0, 0, 0] <= 60 and 185 <= batch['image'][0, 0, -1, 0] <= 192
  seg = [{'image': image, 'mask': np.zeros((80, 120), np.uint8)}]  # Masks and boxes: the whole image.
  whole = next(iter(pipeline.make_eval_batches('seg', seg, image_size=35, batch_size=1)))
  assert whole['image'][0, 0, 0, 0] < 10 and whole['image'][0, 0, -1, 0] > 225
