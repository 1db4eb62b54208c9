"""Runs one command and writes its whole-process wall time, peak memory and the machine's state as JSON.

  python tools/peers/timed.py OUT.json [--wait-quiet LOAD] -- COMMAND [ARGS...]

Both sides of the peer table go through it, so their "process wall" means the same thing: from the interpreter's
start (imports, data building, compilation included) to its exit. Standard library only (it runs under either
environment). Exits with the command's status; OUT.json is written either way.
"""
import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  pylint: disable=wrong-import-position


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if '--' not in argv:
    sys.exit('usage: timed.py OUT.json [--wait-quiet LOAD] -- COMMAND [ARGS...]')
  split = argv.index('--')
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('out', help='where to write the JSON record')
  parser.add_argument('--wait-quiet', type=float, default=None, metavar='LOAD',
                      help='first wait (up to 40 min) for a 1-minute load average <= LOAD')
  args, command = parser.parse_args(argv[:split]), argv[split + 1:]
  if not command:
    sys.exit('timed.py: no command after --')
  if os.path.exists(args.out):
    sys.exit(f'timed.py: {args.out} exists; pick another results folder (earlier results are never overwritten)')
  wait = machine.wait_until_quiet(args.wait_quiet) if args.wait_quiet is not None else None
  meter, load_before, start = machine.CpuMeter().start(), machine.loadavg(), time.perf_counter()
  returncode = subprocess.call(command)
  wall = time.perf_counter() - start
  record = {
      'command': shlex.join(command), 'cwd': os.getcwd(), 'returncode': returncode, 'wall_s': round(wall, 2),
      'max_rss_mb': round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
      'cpu_busy': meter.read(), 'loadavg_before': load_before, 'wait': wait, 'cpu_model': machine.cpu_model(),
      'cpu_count': os.cpu_count(), 'finished': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(record, f, indent=1)
  print(f'[timed] {returncode=} wall {wall:.1f} s, peak RSS {record["max_rss_mb"]:.0f} MB -> {args.out}', flush=True)
  return returncode


if __name__ == '__main__':
  sys.exit(main())
