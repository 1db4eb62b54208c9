"""Metrics against hand-computed values, brute force and closed forms."""
import json

import numpy as np
import pytest

from clflax import metrics

# ---------------------------------------------------------------------------------------------- segmentation


def test_confusion_matrix_matches_loop_and_skips_ignore_and_padding():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 4, size=(3, 5, 6))
  label[rng.random(label.shape) < 0.2] = 255
  pred = rng.integers(0, 4, size=(3, 5, 6))
  valid = np.array([True, False, True])
  want = np.zeros((4, 4), np.int64)
  for b in (0, 2):
    for y, p in zip(label[b].ravel(), pred[b].ravel()):
      if y != 255:
        want[y, p] += 1
  got = metrics.confusion_matrix(pred, label, 4, valid=valid)
  np.testing.assert_array_equal(got, want)
  # Accumulating two halves equals the whole.
  halves = sum(metrics.confusion_matrix(pred[s], label[s], 4, valid=valid[s]) for s in (slice(0, 2), slice(2, 3)))
  np.testing.assert_array_equal(halves, want)


def test_confusion_matrix_rejects_out_of_range():
  with pytest.raises(ValueError, match="label values"):
    metrics.confusion_matrix(np.zeros((1, 2)), np.array([[0, 7]]), 3)
  with pytest.raises(ValueError, match="shape"):
    metrics.confusion_matrix(np.zeros((1, 2)), np.zeros((2, 1)), 3)


def test_miou_hand_computed():
  # rows = gt, cols = pred.  class 0: tp 3, union 4 + 3 - 3 = 4 -> 0.75 ; class 1: tp 2, union 2 + 3 - 2 = 3 ;
  # class 2 absent everywhere -> NaN, excluded ; class 3 predicted once but never in gt -> IoU 0, included.
  conf = np.array([[3, 1, 0, 0],
                   [0, 2, 0, 0],
                   [0, 0, 0, 0],
                   [0, 0, 0, 0]])
  conf[1, 3] = 1  # one class-1 pixel predicted as 3: class 1 union -> 4, class 3 union 1
  mean, per_class = metrics.miou(conf)
  np.testing.assert_allclose(per_class[[0, 1, 3]], [0.75, 2 / 4, 0.0])
  assert np.isnan(per_class[2])
  np.testing.assert_allclose(mean, (0.75 + 0.5 + 0.0) / 3)
  np.testing.assert_allclose(metrics.pixel_accuracy(conf), 5 / 7)
  assert np.isnan(metrics.miou(np.zeros((3, 3)))[0])


def test_miou_from_maps_end_to_end():
  label = np.array([[[0, 0, 1, 1, 255]]])
  pred = np.array([[[0, 1, 1, 1, 0]]])
  mean, _ = metrics.miou(metrics.confusion_matrix(pred, label, 21))
  np.testing.assert_allclose(mean, (1 / 2 + 2 / 3) / 2)  # only classes 0 and 1 occur


# -------------------------------------------------------------------------------------------- classification


def test_topk_accuracy_hand_example():
  logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
  labels = np.array([2, 0, 0, 1])
  assert metrics.topk_correct(logits, labels, 1) == 1
  assert metrics.topk_correct(logits, labels, 2) == 2
  np.testing.assert_allclose(metrics.topk_accuracy(logits, labels, 3), 1.0)
  np.testing.assert_allclose(metrics.topk_accuracy(logits, labels, 2, valid=[True, True, False, False]), 1.0)
  with pytest.raises(ValueError, match="k=4"):
    metrics.topk_accuracy(logits, labels, 4)


# ------------------------------------------------------------------------------------------------- detection


def _img(boxes, classes, scores=None):
  out = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "classes": np.asarray(classes, np.int32)}
  if scores is not None:
    out["scores"] = np.asarray(scores, np.float32)
  return out


def test_coco_map_perfect_predictions_and_empty_image(capsys):
  gt = [_img([[10, 20, 50, 80], [0, 0, 30, 30]], [3, 7]), _img([], []), _img([[5, 5, 60, 40]], [3])]
  pred = [_img(g["boxes"], g["classes"], np.linspace(0.9, 0.5, len(g["classes"]))) for g in gt]
  out = metrics.coco_map(pred, gt, per_class=True)
  np.testing.assert_allclose([out["map"], out["ap50"], out["ap75"]], 1.0)
  np.testing.assert_array_equal(np.flatnonzero(~np.isnan(out["per_class"])), [3, 7])
  assert capsys.readouterr().out == ""  # pycocotools' prints are silenced


def test_coco_map_iou_threshold_behaviour():
  # gt [x, y, w, h] = [0, 0, 100, 100]; prediction shifted 20 px in x: IoU = 80 / 120 = 2/3.
  gt = [_img([[0, 0, 100, 100]], [0])]
  pred = [_img([[0, 20, 100, 120]], [0], [0.9])]
  out = metrics.coco_map(pred, gt)
  assert out["ap50"] == pytest.approx(1.0) and out["ap75"] == 0.0
  np.testing.assert_allclose(out["map"], 0.4)  # thresholds .50 .55 .60 .65 pass, .70 ... .95 fail


def test_coco_map_101_point_interpolation_closed_form():
  # Two objects, ranking TP (0.9), FP (0.8), TP (0.7): precision 1 up to recall 0.5, then 2/3.
  # COCO samples 101 recall points: 51 in [0, 0.5] at precision 1, 50 in (0.5, 1] at 2/3.
  gt = [_img([[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1])]
  pred = [_img([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [1, 1, 1], [0.9, 0.8, 0.7])]
  out = metrics.coco_map(pred, gt)
  np.testing.assert_allclose(out["map"], (51 + 50 * 2 / 3) / 101, rtol=1e-9)


def test_coco_map_padding_wrong_class_and_empty_cases():
  gt = [{"boxes": np.array([[0, 0, 10, 10], [0, 0, 0, 0]]), "classes": np.array([2, 0]),
         "box_valid": np.array([True, False]), "valid": True}]
  wrong_class = [_img([[0, 0, 10, 10]], [5], [0.9])]
  assert metrics.coco_map(wrong_class, gt)["map"] == 0.0
  padded = [{"boxes": np.array([[0, 0, 10, 10], [0, 0, 0, 0]]), "classes": np.array([2, 9]),
             "scores": np.array([0.9, 0.99]), "valid": np.array([True, False])}]
  assert metrics.coco_map(padded, gt)["map"] == pytest.approx(1.0)  # the padded box of class 9 is not a false positive
  no_dets = metrics.coco_map([_img([], [], [])], gt, per_class=True)
  assert no_dets["map"] == 0.0 and no_dets["per_class"][2] == 0.0 and np.isnan(no_dets["per_class"][0])
  no_gt = metrics.coco_map([_img([[0, 0, 5, 5]], [1], [0.5])], [_img([], [])])
  assert np.isnan(no_gt["map"]) and "no ground-truth" in no_gt["note"]
  with pytest.raises(ValueError, match="2 prediction images but 1"):
    metrics.coco_map(wrong_class * 2, gt)


def test_coco_map_on_real_annotations_is_perfect_for_the_ground_truth(shared_data):
  labels = json.loads((shared_data / "mini_coco_det" / "val" / "labels.json").read_text())
  cats = sorted({a["category_id"] for a in labels["annotations"]})
  per_image = {img["id"]: [] for img in labels["images"]}
  for ann in labels["annotations"]:
    x, y, w, h = ann["bbox"]
    per_image[ann["image_id"]].append(([y, x, y + h, x + w], cats.index(ann["category_id"])))
  gt = [_img([b for b, _ in anns], [c for _, c in anns]) for anns in per_image.values()]
  rng = np.random.default_rng(0)
  pred = [dict(g, scores=rng.random(len(g["classes"]))) for g in gt]
  assert metrics.coco_map(pred, gt)["map"] == pytest.approx(1.0)
  # Dropping every other image's detections lowers the AP, which stays above 0.
  partial = [p if i % 2 else _img([], [], []) for i, p in enumerate(pred)]
  assert 0.0 < metrics.coco_map(partial, gt)["map"] < 1.0


def _brute_force_ap(scores, positive):
  order = np.argsort(-scores)
  hits, precisions = 0, []
  for rank, i in enumerate(order, start=1):
    if positive[i]:
      hits += 1
      precisions.append(hits / rank)
  return np.mean(precisions)


def test_image_level_map_matches_brute_force():
  rng = np.random.default_rng(1)
  scores = rng.random((40, 6))
  present = rng.random((40, 6)) < 0.3
  present[:, 4] = False  # a class never present: excluded
  want = [_brute_force_ap(scores[:, c], present[:, c]) for c in (0, 1, 2, 3, 5)]
  ap = metrics.image_level_ap(scores, present)
  np.testing.assert_allclose(ap[[0, 1, 2, 3, 5]], want)
  assert np.isnan(ap[4])
  np.testing.assert_allclose(metrics.image_level_map(scores, present), np.mean(want))


def test_average_precision_ties_and_hand_values():
  # Ranking pos, neg, pos: (1 + 2/3) / 2.
  np.testing.assert_allclose(metrics.average_precision([0.9, 0.5, 0.1], [True, False, True]), 5 / 6)
  # A tie between a positive and a negative is one threshold: precision 1/2, whatever the order.
  assert metrics.average_precision([0.5, 0.5], [True, False]) == 0.5
  assert metrics.average_precision([0.5, 0.5], [False, True]) == 0.5
  assert np.isnan(metrics.image_level_map(np.zeros((2, 2)), np.zeros((2, 2), bool)))


def test_present_classes_respects_box_mask():
  classes = np.array([[1, 3, 0], [2, 2, 1]])
  box_valid = np.array([[True, True, False], [True, False, False]])
  want = np.zeros((2, 4), bool)
  want[0, [1, 3]] = want[1, 2] = True
  np.testing.assert_array_equal(metrics.present_classes(classes, box_valid, 4), want)


def test_unbatch_drops_padding_rows():
  batch = {"boxes": np.arange(24).reshape(3, 2, 4), "scores": np.ones((3, 2))}
  images = metrics.unbatch(batch, valid=[True, False, True])
  assert len(images) == 2
  np.testing.assert_array_equal(images[1]["boxes"], batch["boxes"][2])


# ------------------------------------------------------------------------------------------------- continual

R = np.array([[80.0, 10.0, 5.0],
              [70.0, 60.0, 8.0],
              [65.0, 50.0, 90.0]])


def test_continual_summary_hand_computed():
  out = metrics.continual_summary(R, baseline=[0.0, 5.0, 10.0])
  np.testing.assert_allclose(out["acc"], (65 + 50 + 90) / 3)
  np.testing.assert_allclose(out["bwt"], ((65 - 80) + (50 - 60)) / 2)
  np.testing.assert_allclose(out["fwt"], ((10 - 5) + (8 - 10)) / 2)
  np.testing.assert_allclose(out["forgetting"], (max(80 - 65, 70 - 65) + max(10 - 50, 60 - 50)) / 2)
  assert "fwt" not in metrics.continual_summary(R)


def test_forgetting_uses_the_peak_not_the_own_stage_score():
  # Task 0 improves after stage 1 (positive BWT) yet drops from its peak of 70 by the end.
  r = np.array([[50.0, 0, 0], [70.0, 40, 0], [60.0, 40, 30]])
  out = metrics.continual_summary(r)
  np.testing.assert_allclose(out["bwt"], ((60 - 50) + (40 - 40)) / 2)
  np.testing.assert_allclose(out["forgetting"], ((70 - 60) + max(0 - 40, 40 - 40)) / 2)


def test_continual_summary_single_stage_and_bad_shapes():
  out = metrics.continual_summary([[42.0]], baseline=[10.0])
  assert out == {"acc": 42.0, "bwt": 0.0, "forgetting": 0.0, "fwt": 0.0}
  with pytest.raises(ValueError, match="square"):
    metrics.continual_summary(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="baseline"):
    metrics.continual_summary(R, baseline=[1.0, 2.0])


def test_criterion():
  out = metrics.criterion(R, ["seg", "det", "cls"], tolerance=12.0)
  assert out["seg"] == {"baseline": 80.0, "final": 65.0, "drop": 15.0, "passed": False}
  assert out["det"] == {"baseline": 60.0, "final": 50.0, "drop": 10.0, "passed": True}
  assert out["cls"] == {"baseline": 90.0, "final": 90.0, "drop": 0.0, "passed": True}
  # The boundary counts as passed: final == baseline - tolerance.
  assert metrics.criterion(R, ["a", "b", "c"], tolerance=15.0)["a"]["passed"]
  with pytest.raises(ValueError, match="task names"):
    metrics.criterion(R, ["seg"])
