"""What a run prints: one line per event, each once, and the stage-wise table at the end.

`RunProgress` is clu's `ReportProgress` (periodic_actions) reading the rate over the last interval, with the time
spent in its `timed` parts (evaluation, compilation, checkpoints) taken out of that interval, so the rate and the
ETAs are those of training alone; it also allows the many-step jumps of on-device epochs. The run's ETA adds the
remaining steps of the later stages at the rate measured for their head (the current rate until one is known) and
the evaluations still to come at the mean evaluation time so far.
"""
import time
from typing import Mapping, Sequence

from absl import logging
from clu import periodic_actions


def duration(seconds: float) -> str:
  """'1h02m', '12m03s' or '45s'."""
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  return f'{minutes}m{secs:02d}s' if minutes else f'{secs}s'


def scores_line(row: Mapping[str, Mapping[str, float]]) -> str:
  """'seg miou 33.8, pixel_acc 80.1 | det map 0.0, ...' for every task of a row of scores."""
  return ' | '.join(f'{task} ' + ', '.join(f'{m} {v:.2f}' for m, v in scores.items()) for task, scores in row.items())


class RunProgress(periodic_actions.ReportProgress):
  """Console progress of a run: `report(...)` at the trainer's logging points prints one line; time the work that
  is not training with `timed(name)`."""

  def __init__(self, *, stage_steps: Sequence[int], kinds: Sequence[str], evaluations: int, programs: int):
    super().__init__(num_train_steps=None, writer=None, every_steps=None, every_secs=None)
    self._stage_steps, self._kinds = list(stage_steps), list(kinds)
    self._evaluations_left, self._programs_left = evaluations, programs
    self._compile_seconds, self._compile_count = 0.0, 0
    self._rates = {}  # Head kind -> latest measured steps/s.
    self._excluded_before = 0.0  # Timed seconds before the last report.
    self._eval_seconds, self._eval_count = 0.0, 0
    self.last_line = ''

  # On-device epochs advance thousands of steps per call: no step-by-step bookkeeping.
  def _init_and_check(self, step: int, t: float):
    if self._previous_step is None:
      self._previous_step, self._previous_time = step, t
    self._last_step = step

  def _should_trigger(self, step: int, t: float) -> bool:
    return step != self._previous_step  # The trainer reports at its logging points only.

  def evaluated(self, seconds: float) -> None:
    """Records one finished evaluation (for the run's ETA)."""
    self._eval_seconds += seconds
    self._eval_count += 1
    self._evaluations_left = max(0, self._evaluations_left - 1)

  def compiled(self, seconds: float) -> None:
    """Records one compiled program (for the run's ETA: the programs still to compile)."""
    self._compile_seconds += seconds
    self._compile_count += 1
    self._programs_left = max(0, self._programs_left - 1)

  def restart_interval(self, step: int, t=None) -> None:
    """Starts a new measuring interval at `step` (a new stage: a new head, a new program)."""
    self._previous_step, self._previous_time = step, time.monotonic() if t is None else t
    self._excluded_before = sum(self._time_per_part.values())

  def report(self, stage: int, stage_step: int, label: str, losses: Mapping[str, float], t=None) -> bool:
    """Prints a progress line when an interval is over; True if it did (`t`: the time, default now)."""
    self._label, self._losses, self._stage, self._stage_step = label, losses, stage, stage_step
    return self(sum(self._stage_steps[:stage]) + stage_step, t)

  def timed_seconds(self) -> float:
    """Seconds spent so far in the timed parts (eval, compile, checkpoint, ...), i.e. not training."""
    return float(sum(self._time_per_part.values()))

  def breakdown(self) -> str:
    """'4m12s in all: eval 31.0%, compile 12.2%, ...': where the run's time went (the timed parts)."""
    total = time.monotonic() - self._t0
    parts = ', '.join(f'{name} {duration(dt)} ({100 * dt / total:.0f}%)'
                      for name, dt in sorted(self._time_per_part.items(), key=lambda kv: -kv[1]))
    return f'{duration(total)} in all; {parts}; the rest training and setup'

  def _apply(self, step: int, t: float):
    excluded = sum(self._time_per_part.values())
    seconds = (t - self._previous_time) - (excluded - self._excluded_before)
    self._excluded_before = excluded
    rate = (step - self._previous_step) / max(seconds, 1e-9)
    kind = self._kinds[self._stage]
    self._rates[kind] = rate
    stage_left = (self._stage_steps[self._stage] - self._stage_step) / rate
    later = sum(n / self._rates.get(k, rate) for n, k in zip(self._stage_steps[self._stage + 1:],
                                                             self._kinds[self._stage + 1:]))
    evals = self._evaluations_left * (self._eval_seconds / self._eval_count if self._eval_count else 0.0)
    evals += self._programs_left * (self._compile_seconds / self._compile_count if self._compile_count else 0.0)
    losses = ', '.join(f'{k} {v:.4g}' for k, v in sorted(self._losses.items()) if k != 'total')
    total = self._losses.get('total')
    loss_text = f'loss {total:.4g}' + (f' ({losses})' if losses else '') if total is not None else losses
    self.last_line = (f'{self._label} | step {self._stage_step}/{self._stage_steps[self._stage]} | {loss_text} | '
                      f'{rate:.3g} steps/s | stage ETA {duration(stage_left)} | '
                      f'run ETA {duration(stage_left + later + evals)}')
    logging.info('%s', self.last_line)
