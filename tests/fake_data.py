"""Random in-memory examples with the pipeline's keys, shapes and dtypes, for tests that run the real trainer."""
import numpy as np


def arrays(task: str, n: int, seed: int, size: int) -> dict:
  """`n` examples of head `task` ('seg', 'det' or 'cls') at `size` px, drawn from `seed`."""
  rng = np.random.default_rng(seed)
  out = {'image': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)}
  if task == 'seg':
    out['mask'] = rng.integers(0, 21, (n, size, size)).astype(np.int32)
  elif task == 'det':
    corner = rng.uniform(0, size / 2, (n, 4, 2))
    out['boxes'] = np.concatenate([corner, corner + rng.uniform(4, size / 2, (n, 4, 2))], -1).astype(np.float32)
    out['classes'] = rng.integers(0, 80, (n, 4)).astype(np.int32)
    out['box_valid'] = np.arange(4)[None] < rng.integers(1, 5, (n, 1))
  else:
    out['label'] = rng.integers(0, 10, n).astype(np.int32)
  return out


def digits(n: int, seed: int, classes: int = 10, dim: int = 32, noise: float = 0.05) -> dict:
  """`n` separable fake digits: float32 [n, dim] images in [0, 1] around one fixed prototype per class (the same
  prototypes for every seed), int32 labels."""
  prototypes = np.random.default_rng(1234).uniform(0, 1, (classes, dim))
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  images = np.clip(prototypes[labels] + rng.normal(0, noise, (n, dim)), 0, 1)
  return {'image': images.astype(np.float32), 'label': labels.astype(np.int32)}
