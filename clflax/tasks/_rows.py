"""Accumulating per-example eval outputs over batches (padding rows dropped), for kinds scored on all of them."""
import numpy as np


def new_accumulator() -> dict:
  return {'outputs': [], 'batches': []}


def accumulate(acc: dict, outputs: dict, batch: dict, keys) -> dict:
  """Adds one batch's outputs (on the host) and its ground-truth `keys`, without the padding rows."""
  valid = np.asarray(batch['valid'])
  acc['outputs'].append({k: np.asarray(v)[valid] for k, v in outputs.items()})
  acc['batches'].append({k: np.asarray(batch[k])[valid] for k in keys})
  return acc


def concat(parts: list[dict]) -> dict:
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
