"""The benchmark's harness and report: interleaved timing, the reference's parsing, ratios and goals."""
import json
import os

import jax
import pytest

from clflax.bench import run as bench
from clflax.bench import report as bench_report


def _write_jsonl(path, records):
  with open(path, 'w') as f:
    f.write('not json: a log line the reader must skip\n')
    for r in records:
      f.write(json.dumps(r) + '\n')


def _torch_ref(folder, res=224):
  """A reference folder as the PyTorch scripts write it (values chosen so the expected ratios are round)."""
  _write_jsonl(os.path.join(folder, 'multitask_step.jsonl'), [
      {'kind': 'train_step', 'head': 'cls', 'res': res, 'median_s': 0.9},
      {'kind': 'train_step', 'head': 'cls', 'res': 128, 'median_s': 0.3}])  # Another resolution: ignored.
  _write_jsonl(os.path.join(folder, 'ewc.jsonl'), [
      {'kind': 'ewc_step', 'head': 'cls', 'res': res, 'variant': 'ewc', 'median_s': 1.0},
      {'kind': 'fisher_per_sample', 'head': 'cls', 'res': res, 's_per_sample_overall': 0.2}])
  _write_jsonl(os.path.join(folder, 'agem.jsonl'), [
      {'kind': 'agem_cnn', 'head': 'cls', 'res': res, 'variant': 'agem', 'median_s': 1.8}])


def test_time_interleaved_alternates_the_calls_and_times_each():
  order = []
  calls = [lambda name=name, t=t: (order.append(name), t)[1] for name, t in (('a', 1.0), ('b', 2.0), ('c', 3.0))]
  times = bench.time_interleaved(calls, warmup=1, iters=2)
  # One warm-up round, then two rounds of each in turn, each timed run right after an untimed one of its own.
  assert order == ['a', 'b', 'c'] + ['a', 'a', 'b', 'b', 'c', 'c'] * 2
  assert times == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
  order.clear()
  bench.time_interleaved(calls, warmup=0, iters=1, settle=0)
  assert order == ['a', 'b', 'c']


def test_report_ratios_and_goals_against_a_reference(tmp_path):
  _torch_ref(tmp_path)
  ref = bench_report.read_torch_ref(str(tmp_path), 224)
  assert ref['step'] == {'cls': 0.9} and ref['fisher'] == {'cls': 0.2}
  compiled = {'trace_s': 1.0, 'compile_cold_s': 2.0}
  rows = [{'kind': 'step', 'head': 'cls', 'strategy': 'naive', 'median_s': 0.5, 'images_per_s': 16.0, **compiled},
          {'kind': 'step', 'head': 'cls', 'strategy': 'ewc', 'median_s': 0.55, 'images_per_s': 8 / 0.55, **compiled},
          {'kind': 'step', 'head': 'cls', 'strategy': 'agem', 'median_s': 1.2, 'images_per_s': 8 / 1.2, **compiled},
          {'kind': 'fisher', 'head': 'cls', 's_per_sample': 0.1, 'n_samples': 4, **compiled}]
  out = bench_report.compare(rows, ref)
  assert out['ratios'] == pytest.approx({'ewc/naive cls': 1.1, 'agem/naive cls': 2.4})
  assert rows[0]['speedup_vs_torch'] == pytest.approx(1.8)  # 0.9 s / 0.5 s.
  assert rows[1]['speedup_vs_torch'] == pytest.approx(1.0 / 0.55)
  assert rows[2]['speedup_vs_torch'] == pytest.approx(1.5)
  assert rows[3]['batched_s_per_image'] == pytest.approx(1 / 16)
  assert rows[3]['fisher_speedup_vs_torch'] == pytest.approx(2.0)
  met = {name: g['met'] for name, g in out['goals'].items()}
  # 1.8 / 1.82 / 1.5 all >= 1.5; A-GEM 2.4 > 2.1; EWC 1.1 > 1.05; Fisher 2x < 10x.
  assert met == {'speedup_vs_torch': True, 'agem_over_plain': False, 'ewc_over_plain': False,
                 'fisher_speedup_vs_torch': False}
  assert 'goal agem_over_plain (target 2.1): NOT MET [cls 2.40]' in bench_report.table(rows, out)



def test_ratio_to_plain_pairs_the_interleaved_rounds():
  compiled = {'trace_s': 1.0, 'compile_cold_s': 2.0, 'images_per_s': 1.0}
  # Round by round EWC takes 1.2x, 1.0x, 1.1x the plain step: the machine slowed down across the rounds, so the
  # ratio of the medians (2.0 / 2.0 = 1.0) hides what the rounds show.
  rows = [{'kind': 'step', 'head': 'cls', 'strategy': 'naive', 'median_s': 2.0, 'times_s': [1.0, 2.0, 3.0],
           **compiled},
          {'kind': 'step', 'head': 'cls', 'strategy': 'ewc', 'median_s': 2.0, 'times_s': [1.2, 2.0, 3.3],
           **compiled},
          {'kind': 'step', 'head': 'det', 'strategy': 'naive', 'median_s': 2.0, 'times_s': [2.0, 2.0], **compiled},
          {'kind': 'step', 'head': 'det', 'strategy': 'ewc', 'median_s': 3.0, 'times_s': [3.0], **compiled}]
  out = bench_report.compare(rows, None)
  assert out['ratios']['ewc/naive cls'] == pytest.approx(1.1)
  assert out['ratio_quartiles']['ewc/naive cls'] == pytest.approx((1.05, 1.15))
  assert out['ratios']['ewc/naive det'] == pytest.approx(1.5)  # Rounds that do not pair: medians' ratio.
  assert 'ewc/naive det' not in out['ratio_quartiles']
  assert out['goals']['ewc_over_plain']['met'] is False
  assert 'ratio ewc/naive cls: 1.100 (per round: quartiles 1.050-1.150)' in bench_report.table(rows, out)

def test_bench_runs_end_to_end_on_the_tiny_model(tmp_path, capsys):
  _torch_ref(tmp_path, res=32)
  path = tmp_path / 'bench.json'
  cache_settings = [getattr(jax.config, name) for name in bench._CACHE_FLAGS]  # pylint: disable=protected-access
  assert bench.main(['--cache_dir', jax.config.jax_compilation_cache_dir,  # The suite's cache: no switch of folder.
                     '--backbone', 'tiny', '--image_size', '32', '--batch', '2', '--iters', '2', '--warmup', '0',
                     '--heads', 'cls', '--strategies', 'naive', '--fisher_samples', '2', '--classic', 'skip',
                     '--fast_compile', '--no_compile_cache', '--torch_ref', str(tmp_path),
                     '--json', str(path)]) == 0
  results = json.loads(path.read_text())
  steps = {r['strategy']: r for r in results['rows'] if r['kind'] == 'step'}
  assert set(steps) == {'naive'} and steps['naive']['iters'] == 2 and steps['naive']['median_s'] > 0
  assert steps['naive']['speedup_vs_torch'] == pytest.approx(0.9 / steps['naive']['median_s'])
  (fisher,) = [r for r in results['rows'] if r['kind'] == 'fisher']
  assert fisher['n_samples'] == 2 and fisher['fisher_speedup_vs_torch'] == pytest.approx(0.2 / fisher['s_per_sample'])
  assert 'goal speedup_vs_torch (target 1.5)' in capsys.readouterr().out
  # The rest of the suite keeps its cache settings (the bench caches every compile while it runs).
  assert [getattr(jax.config, name) for name in bench._CACHE_FLAGS] == cache_settings  # pylint: disable=protected-access


def test_bench_refuses_bad_flags_before_any_compute(capsys):
  assert bench.main(['--image_size', '100']) == 2
  assert 'multiple of 32' in capsys.readouterr().err
