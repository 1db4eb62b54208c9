"""The machine's state around a timed run: load average, CPU busy fractions, CPU model, waiting for quiet.

Used by avalanche_runner.py (and usable from any timing script): standard library only, Linux /proc.
"""
import os
import platform
import time



def loadavg():
  with open('/proc/loadavg') as f:
    return [float(x) for x in f.read().split()[:3]]


def cpu_jiffies():
  """(busy, total) jiffies over all CPUs."""
  with open('/proc/stat') as f:
    parts = [int(x) for x in f.readline().split()[1:]]
  idle = parts[3] + parts[4]
  total = sum(parts[:8])
  return total - idle, total


class CpuMeter:
  """Busy fraction of the whole machine, of this process and of the rest (1.0 = every core busy) since start()."""

  def start(self):
    self.t, (self.busy, self.total), self.own = time.perf_counter(), cpu_jiffies(), self._own()
    return self

  @staticmethod
  def _own():
    """CPU seconds of this process and of its finished children (timed.py's command is a child)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system

  def read(self):
    now, (busy, total), own = time.perf_counter(), cpu_jiffies(), self._own()
    machine = (busy - self.busy) / max(total - self.total, 1)
    mine = (own - self.own) / max(now - self.t, 1e-9) / (os.cpu_count() or 1)
    return {'machine': round(machine, 3), 'own': round(mine, 3), 'other': round(max(machine - mine, 0.), 3)}


def cpu_model():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def wait_until_quiet(threshold, poll_s=30, max_wait_s=40 * 60):
  t0 = time.time()
  while True:
    la = loadavg()
    if la[0] <= threshold or time.time() - t0 >= max_wait_s:
      return {'waited_s': round(time.time() - t0), 'gave_up': la[0] > threshold, 'loadavg_at_start': la}
    print(f'[wait] 1-min load {la[0]:.2f} > {threshold}; sleeping {poll_s}s', flush=True)
    time.sleep(poll_s)
