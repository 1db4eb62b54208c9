"""The console's progress line: the rate over the last interval without the timed parts, and the ETAs."""
from clflax.reporting import console


def test_rate_leaves_out_the_timed_parts_and_the_etas_add_up():
  # Two stages of 100 steps (heads a, b), 4 evaluations and 2 programs still to come.
  progress = console.RunProgress(stage_steps=(100, 100), kinds=('a', 'b'), evaluations=4, programs=2)
  progress.restart_interval(0, t=1000.0)
  progress.compiled(6.0)  # One program compiled (6 s), one left.
  progress._time_per_part['compile'] += 6.0  # pylint: disable=protected-access  (as timed('compile') records)
  progress.evaluated(2.0)  # One evaluation (2 s), three left.
  progress._time_per_part['eval'] += 2.0  # pylint: disable=protected-access
  # 20 steps in 28 s of which 8 s compiling and evaluating: 1 step/s of training.
  assert progress.report(0, 20, 'stage 1/2 a', {'total': 0.5, 'ce': 0.5}, t=1028.0)
  line = progress.last_line
  assert '| 1 steps/s |' in line, line
  assert 'stage ETA 1m20s' in line  # 80 steps at 1 step/s.
  # Run ETA: 80 s + the 100 steps of b at a's rate (none measured for b yet) + 3 x 2 s + 1 x 6 s = 192 s.
  assert 'run ETA 3m12s' in line and 'loss 0.5 (ce 0.5)' in line
  assert not progress.report(0, 20, 'stage 1/2 a', {'total': 0.5}, t=1029.0)  # No step since: no line.


def test_durations_read_as_people_write_them():
  assert [console.duration(s) for s in (0.4, 45, 125, 3725)] == ['0s', '45s', '2m05s', '1h02m']
