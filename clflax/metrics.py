"""Evaluation metrics, host side (NumPy / pycocotools), built to accumulate across eval batches.

Units: the task metrics return fractions in [0, 1]; the continual summaries are unit-agnostic (the trainer stores
its matrices in percent, so `criterion`'s default tolerance of 5.0 means 5 points).
Accumulation: segmentation sums `confusion_matrix` over batches; classification sums `topk_correct`;
detection collects per-image dicts (`unbatch`) and calls `coco_map` / `image_level_map` once at the end.
"""
import contextlib
import io
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

# --------------------------------------------------------------------------------------------- segmentation


def _valid_rows(x: np.ndarray, valid: Optional[Any]) -> np.ndarray:
  if valid is None:
    return x
  valid = np.asarray(valid, bool)
  if valid.shape != x.shape[:1]:
    raise ValueError(f"valid has shape {valid.shape}, expected ({x.shape[0]},)")
  return x[valid]


def confusion_matrix(pred, label, num_classes: int, ignore_index: Optional[int] = 255,
                     valid=None) -> np.ndarray:
  """[num_classes, num_classes] int64 counts, rows = ground truth, columns = prediction.

  `pred` and `label` are integer maps of one shape (e.g. [B, H, W]); pixels labelled `ignore_index` and rows
  with `valid` False are skipped. Sum the matrices of all batches to accumulate.
  """
  pred, label = np.asarray(pred), np.asarray(label)
  if pred.shape != label.shape:
    raise ValueError(f"pred {pred.shape} and label {label.shape} differ in shape")
  pred, label = _valid_rows(pred, valid).ravel(), _valid_rows(label, valid).ravel()
  if ignore_index is not None:
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
  for name, x in (("label", label), ("pred", pred)):
    if x.size and (x.min() < 0 or x.max() >= num_classes):
      raise ValueError(f"{name} values must lie in [0, {num_classes}) (or be ignore_index={ignore_index}), "
                       f"got range [{x.min()}, {x.max()}]")
  counts = np.bincount(label.astype(np.int64) * num_classes + pred.astype(np.int64),
                       minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes)


def miou(conf) -> Tuple[float, np.ndarray]:
  """(mean IoU, per-class IoU) from a confusion matrix (rows = ground truth).

  IoU_c = TP / (TP + FP + FN). As in the VOC evaluation, a class with union 0 (absent from both ground truth and
  predictions) has IoU NaN and is left out of the mean; a class predicted but absent from the ground truth counts
  with IoU 0. An empty matrix gives NaN.
  """
  conf = np.asarray(conf, np.float64)
  if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
    raise ValueError(f"confusion matrix must be square, got shape {conf.shape}")
  tp = np.diag(conf)
  union = conf.sum(0) + conf.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
  mean = float(np.nanmean(iou)) if np.any(union > 0) else float("nan")
  return mean, iou


def pixel_accuracy(conf) -> float:
  """Fraction of counted pixels predicted correctly (NaN for an empty matrix)."""
  conf = np.asarray(conf, np.float64)
  total = conf.sum()
  return float(np.trace(conf) / total) if total else float("nan")


# ------------------------------------------------------------------------------------------- classification


def topk_correct(logits, labels, k: int = 1, valid=None) -> int:
  """Number of examples whose label is among the k highest logits (rows with `valid` False skipped)."""
  logits, labels = np.asarray(logits), np.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"expected logits [B, C] and labels [B], got {logits.shape} and {labels.shape}")
  if not 1 <= k <= logits.shape[1]:
    raise ValueError(f"k={k} must lie in [1, {logits.shape[1]}] (the number of classes)")
  logits, labels = _valid_rows(logits, valid), _valid_rows(labels, valid)
  topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  return int(np.sum(np.any(topk == labels[:, None], axis=1)))


def topk_accuracy(logits, labels, k: int = 1, valid=None) -> float:
  """Top-k accuracy as a fraction of the counted examples (NaN when none)."""
  n = int(np.sum(valid)) if valid is not None else len(np.asarray(labels))
  correct = topk_correct(logits, labels, k, valid)
  return correct / n if n else float("nan")


# ------------------------------------------------------------------------------------------------ detection


def unbatch(batch: Mapping[str, Any], valid=None) -> list:
  """Dict of [B, ...] arrays -> list of per-image dicts of NumPy arrays, padding rows (`valid` False) dropped."""
  arrays = {k: np.asarray(v) for k, v in batch.items()}
  n = len(next(iter(arrays.values())))
  keep = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
  return [{k: v[i] for k, v in arrays.items()} for i in range(n) if keep[i]]


def _to_xywh(boxes: np.ndarray) -> np.ndarray:
  """(ymin, xmin, ymax, xmax) -> COCO [x, y, w, h] (negative extents clipped to 0)."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  ymin, xmin, ymax, xmax = boxes.T
  return np.stack([xmin, ymin, np.maximum(xmax - xmin, 0), np.maximum(ymax - ymin, 0)], axis=1)


def _box_mask(image: Mapping[str, Any], n: int) -> np.ndarray:
  """`box_valid` [K], else a per-box `valid` [K]; a scalar `valid` (the image's own flag) is not a box mask."""
  for key in ("box_valid", "valid"):
    if key in image and np.ndim(image[key]) > 0:
      mask = np.asarray(image[key], bool).reshape(-1)
      if mask.shape != (n,):
        raise ValueError(f"'{key}' has {mask.size} entries for {n} boxes")
      return mask
  return np.ones(n, bool)


def _image_boxes(image: Mapping[str, Any], what: str, need_scores: bool):
  for key in ("boxes", "classes") + (("scores",) if need_scores else ()):
    if key not in image:
      raise ValueError(f"{what} image lacks '{key}' (has {sorted(image)})")
  xywh = _to_xywh(image["boxes"])
  classes = np.asarray(image["classes"]).reshape(-1).astype(np.int64)
  keep = _box_mask(image, len(xywh))
  scores = np.asarray(image["scores"], np.float64).reshape(-1)[keep] if need_scores else None
  return xywh[keep], classes[keep], scores


def coco_map(predictions: Sequence[Mapping[str, Any]], ground_truth: Sequence[Mapping[str, Any]],
             num_classes: int = 80, per_class: bool = False) -> Dict[str, Any]:
  """COCO box AP with pycocotools, on objects built in memory.

  predictions[i] / ground_truth[i] describe the same image: `boxes` [K, 4] (ymin, xmin, ymax, xmax) pixels,
  `classes` [K] in [0, num_classes), predictions also `scores` [K]; an optional bool `box_valid` (or per-box
  `valid`) [K] drops padding boxes. pycocotools keeps the 100 best-scored detections per image.
  Returns {"map": AP@[.5:.95], "ap50", "ap75"} (fractions), "per_class" [num_classes] (NaN for classes without
  ground truth) when asked. With no ground-truth box at all every AP is NaN and "note" says why; with ground
  truth but no detections every AP is 0.
  """
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top

  if len(predictions) != len(ground_truth):
    raise ValueError(f"{len(predictions)} prediction images but {len(ground_truth)} ground-truth images")
  images, gt_anns, dets = [], [], []
  for image_id, (pred, gt) in enumerate(zip(predictions, ground_truth), start=1):
    images.append({"id": image_id})
    for what, image, need_scores in (("ground-truth", gt, False), ("prediction", pred, True)):
      xywh, classes, scores = _image_boxes(image, what, need_scores)
      if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"{what} classes must lie in [0, {num_classes}), got [{classes.min()}, {classes.max()}]")
      for j, (box, cls) in enumerate(zip(xywh, classes)):
        ann = {"image_id": image_id, "category_id": int(cls) + 1, "bbox": [float(v) for v in box]}
        if need_scores:
          dets.append(dict(ann, score=float(scores[j])))
        else:
          gt_anns.append(dict(ann, id=len(gt_anns) + 1, area=float(box[2] * box[3]), iscrowd=0))

  if not gt_anns:
    result = {"map": float("nan"), "ap50": float("nan"), "ap75": float("nan"),
              "note": "no ground-truth boxes: detection AP is undefined"}
    if per_class:
      result["per_class"] = np.full(num_classes, np.nan)
    return result
  if not dets:  # pycocotools' loadRes cannot take an empty list; every AP is 0
    result = {"map": 0.0, "ap50": 0.0, "ap75": 0.0, "note": "no detections"}
    if per_class:
      result["per_class"] = np.full(num_classes, np.nan)
      result["per_class"][np.unique([a["category_id"] - 1 for a in gt_anns])] = 0.0
    return result

  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress unconditionally
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": gt_anns,
                       "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(dets)
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  stats = evaluator.stats
  result = {"map": float(stats[0]), "ap50": float(stats[1]), "ap75": float(stats[2])}
  if per_class:
    # precision: [iou thresholds, recall points, classes, area ranges, max dets]; -1 where a class has no gt.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    valid = precision > -1
    sums = np.where(valid, precision, 0.0).sum((0, 1))
    counts = valid.sum((0, 1))
    with np.errstate(invalid="ignore"):
      result["per_class"] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
  return result


def present_classes(classes, box_valid, num_classes: int = 80) -> np.ndarray:
  """[B, M] box classes + [B, M] bool -> [B, num_classes] bool: which classes each image contains."""
  classes, box_valid = np.asarray(classes, np.int64), np.asarray(box_valid, bool)
  if classes.shape != box_valid.shape:
    raise ValueError(f"classes {classes.shape} and box_valid {box_valid.shape} differ in shape")
  present = np.zeros((classes.shape[0], num_classes), bool)
  rows = np.broadcast_to(np.arange(classes.shape[0])[:, None], classes.shape)
  present[rows[box_valid], classes[box_valid]] = True
  return present


def average_precision(scores, positive) -> float:
  """Non-interpolated AP of one ranking: sum over score thresholds of (recall step) * precision.

  Without tied scores this is the mean of the precision at each positive's rank. Tied scores form one threshold
  (as in scikit-learn), so the result does not depend on how ties are ordered. No positive -> NaN.
  """
  scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
  num_pos = positive.sum()
  if num_pos == 0:
    return float("nan")
  order = np.argsort(-scores, kind="stable")
  scores, positive = scores[order], positive[order]
  tp, fp = np.cumsum(positive), np.cumsum(~positive)
  last_of_tie = np.r_[scores[1:] != scores[:-1], True]  # cumulative counts at each distinct threshold
  tp, fp = tp[last_of_tie], fp[last_of_tie]
  recall_step = np.diff(np.r_[0, tp]) / num_pos
  return float(np.sum(recall_step * tp / (tp + fp)))


def image_level_ap(scores, present) -> np.ndarray:
  """Per-class AP of ranking images by class score ([N, C] scores, [N, C] bool); NaN for classes never present."""
  scores, present = np.asarray(scores), np.asarray(present, bool)
  if scores.shape != present.shape or scores.ndim != 2:
    raise ValueError(f"scores {scores.shape} and present {present.shape} must both be [N, C]")
  return np.array([average_precision(scores[:, c], present[:, c]) for c in range(scores.shape[1])])


def image_level_map(scores, present) -> float:
  """The seed's detection metric: mean image-level AP over classes present in at least one image (NaN if none)."""
  ap = image_level_ap(scores, present)
  return float(np.nanmean(ap)) if np.any(~np.isnan(ap)) else float("nan")


# ----------------------------------------------------------------------------------------------- continual


def _square(matrix) -> np.ndarray:
  r = np.asarray(matrix, np.float64)
  if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
    raise ValueError(f"accuracy matrix must be square [stages, tasks] with stage i learning task i, "
                     f"got shape {r.shape}")
  return r


def continual_summary(matrix, baseline=None) -> Dict[str, float]:
  """ACC, BWT, FWT and forgetting of an accuracy matrix R, R[i, j] = task j's score after stage i.

  acc = mean_j R[T-1, j]; bwt = mean_{j<T-1} (R[T-1, j] - R[j, j]);
  fwt = mean_{j>0} (R[j-1, j] - b_j) (only when `baseline` b, e.g. the untrained model's scores, is given);
  forgetting = mean_{j<T-1} max_{l<T-1} (R[l, j] - R[T-1, j]).
  With one stage nothing can be forgotten or transferred: bwt, forgetting (and fwt) are 0.
  """
  r = _square(matrix)
  t = r.shape[0]
  final = r[-1]
  out = {"acc": float(final.mean()), "bwt": 0.0, "forgetting": 0.0}
  if t > 1:
    out["bwt"] = float(np.mean(final[:-1] - np.diag(r)[:-1]))
    out["forgetting"] = float(np.mean(np.max(r[:-1, :-1] - final[None, :-1], axis=0)))
  if baseline is not None:
    b = np.asarray(baseline, np.float64).reshape(-1)
    if b.shape != (t,):
      raise ValueError(f"baseline must hold one score per task ({t}), got shape {b.shape}")
    out["fwt"] = float(np.mean(np.diag(r, 1) - b[1:])) if t > 1 else 0.0
  return out


def criterion(matrix, task_names: Sequence[str], tolerance: float = 5.0) -> Dict[str, Dict[str, Any]]:
  """The seed's forgetting criterion: each task's final score within `tolerance` of its own-stage score."""
  r = _square(matrix)
  if len(task_names) != r.shape[0]:
    raise ValueError(f"{len(task_names)} task names for a {r.shape[0]}-task matrix")
  out = {}
  for j, name in enumerate(task_names):
    baseline, final = float(r[j, j]), float(r[-1, j])
    out[name] = {"baseline": baseline, "final": final, "drop": baseline - final,
                 "passed": bool(final >= baseline - tolerance)}
  return out
