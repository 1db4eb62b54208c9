"""The classic protocols' one-call evaluation on the device against a numpy forward pass over the same test rows."""
import jax
import jax.numpy as jnp
import numpy as np

from clflax.data import benchmarks
from clflax.data import classic
from clflax.trainer import evaluation
from clflax.trainer import setup
from clflax.trainer import steps
from configs import permuted_mnist
from configs import split_mnist


def _numpy_accuracy(params, seq, task_id, labels):
  """Accuracy (percent) of the MLP `params` on task `task_id`'s test rows, computed with numpy only."""
  rows = seq.test.index[task_id]
  x = seq.images[rows].reshape(len(rows), -1).astype(np.float32)[:, seq.perms[task_id]] / 255.
  mlp = params['params']['mlp']
  dense = [jax.tree.map(np.asarray, mlp[name]) for name in ('hidden_0', 'hidden_1', 'out')]
  h = x
  for i, layer in enumerate(dense):
    h = h @ layer['kernel'] + layer['bias']
    if i + 1 < len(dense):
      h = np.maximum(h, 0)
  return 100 * np.mean(np.argmax(h, -1) == labels[task_id])


def test_one_call_evaluation_matches_numpy_on_every_task(shared_data):
  config = permuted_mnist.get_config('vanilla,smoke')
  config.data_dir = str(shared_data)
  config.train.eval_batch_size = 64  # Several batches per task, the last one padded.
  data = classic.load_data(config)
  model = setup.build_model(config)
  variables = setup._init_variables(config, model, data)  # pylint: disable=protected-access
  assert set(variables['params']['mlp']) == {'hidden_0', 'hidden_1', 'out'}  # What _numpy_accuracy computes.
  source, batch_fn, num_batches, ids = data.device_eval
  program = steps.jit_device_evaluation(model, config.tasks[0], 0, batch_fn, num_batches)
  scores = evaluation.device_evaluation(program, source, ids).evaluate(config.tasks, variables)
  seq = classic._sequence(config)  # pylint: disable=protected-access
  assert seq.test.index.shape[1] % 64  # The padding path is exercised.
  for task in config.tasks:
    assert abs(scores[task]['acc'] - _numpy_accuracy(variables, seq, ids[task], seq.test.labels)) < 1e-6, task


def test_one_call_evaluation_counts_each_test_row_once(shared_data):
  config = split_mnist.get_config('vanilla,smoke')
  config.data_dir = str(shared_data)
  config.train.eval_batch_size = 50
  data = classic.load_data(config)
  source, batch_fn, num_batches, ids = data.device_eval
  counted = jax.jit(lambda s, t: jnp.sum(jnp.stack([batch_fn(s, t, b)['valid'] for b in range(num_batches)])))
  seq = classic._sequence(config)  # pylint: disable=protected-access
  for task, t in ids.items():
    assert int(counted(source, t)) == seq.test.index.shape[1]
    labels = np.concatenate([np.asarray(batch_fn(source, t, b)['label'])[np.asarray(batch_fn(source, t, b)['valid'])]
                             for b in range(num_batches)])
    np.testing.assert_array_equal(labels, seq.test.labels[t])
    assert set(np.unique(labels)) <= set(benchmarks.split_classes(5, 2)[t].tolist())
