"""The detection evaluation path end to end on real COCO annotations: the data pipeline's boxes, CenterNet's
targets turned into perfect head outputs, decoding, and pycocotools must give back (almost) every box."""
import jax
import jax.numpy as jnp

from clflax.data import pipeline
from clflax.data import inputs
from clflax import tasks
from clflax.models import heads
from configs import naive


def _oracle_outputs(batch):
  """Head outputs a perfect CenterNet would give: the target heatmap as logits, sizes and offsets at the centres."""
  targets = heads.encode_targets(batch['boxes'], batch['classes'], batch['box_valid'], batch['image'].shape[1:3])
  heat = jnp.clip(targets['heatmap'], 1e-4, 1 - 1e-4)
  b, h, w, _ = heat.shape

  def at_centres(values):
    flat = jax.vmap(lambda i, v, ok: jnp.zeros((h * w, 2)).at[jnp.where(ok, i, h * w)].set(v, mode='drop'))(
        targets['index'], values, targets['valid'])
    return flat.reshape(b, h, w, 2)

  return {'heatmap': jnp.log(heat) - jnp.log1p(-heat), 'size': at_centres(targets['size']),
          'offset': at_centres(targets['offset'])}


def test_perfect_head_outputs_score_near_100_on_the_mini_coco_val_set(shared_data):
  config = naive.get_config()
  config.data_dir, config.tasks, config.model.image_size = str(shared_data), ('det',), 160
  data = pipeline.trainer_data(config)
  acc = tasks.new_accumulator('det')
  for batch in data.eval_batches['det']:
    outputs = tasks.eval_outputs('det', _oracle_outputs(batch), batch, max_detections=100)
    acc = tasks.accumulate('det', acc, jax.device_get(outputs), batch)
  scores = tasks.scores('det', acc)
  # Below 100 only where two objects of one class share a stride-8 centre cell at 160 px.
  assert scores['map'] > 90 and scores['ap50'] > 90, scores
  assert scores['image_map'] == 100.0, scores
