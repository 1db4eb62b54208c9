"""clflax.hugepages: when the process restarts with glibc's huge-page tunable, and that the restart does its job."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from clflax.runtime import hugepages

_REPO = pathlib.Path(__file__).resolve().parents[1]
GLIBC = (2, 36)


@pytest.mark.parametrize('text, mode', [('always [madvise] never\n', 'madvise'), ('[always] madvise never\n', 'always'),
                                        ('always madvise [never]\n', 'never'), ('garbled\n', None)])
def test_thp_mode_is_the_bracketed_word_of_the_sysfs_file(tmp_path, text, mode):
  path = tmp_path / 'enabled'
  path.write_text(text)
  assert hugepages.thp_mode(str(path)) == mode


def test_thp_mode_of_a_missing_file_is_unknown(tmp_path):
  assert hugepages.thp_mode(str(tmp_path / 'absent')) is None


def test_tuned_environ_appends_the_tunable_and_keeps_everything_else():
  env = {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.check=3'}
  tuned = hugepages.tuned_environ(env, 'madvise', GLIBC)
  assert tuned == {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.check=3:glibc.malloc.hugetlb=1'}
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.check=3'  # The caller's mapping is not changed.
  assert hugepages.tuned_environ({}, 'madvise', GLIBC) == {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}


@pytest.mark.parametrize('env, mode, glibc', [
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'madvise', GLIBC),  # The user's own choice stands.
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, 'madvise', GLIBC),  # Already restarted: no loop.
    ({'CLFLAX_HUGEPAGES': '0'}, 'madvise', GLIBC),  # Opted out.
    ({}, 'always', GLIBC),  # The kernel gives huge pages anyway.
    ({}, 'never', GLIBC),  # Nothing can give them.
    ({}, None, GLIBC),  # No THP support readable.
    ({}, 'madvise', (2, 34)),  # glibc without the tunable.
    ({}, 'madvise', None),  # Not glibc (musl).
])
def test_no_restart_where_it_would_change_nothing(env, mode, glibc):
  assert hugepages.tuned_environ(env, mode, glibc) is None


@pytest.mark.parametrize('env, plugins, cpu', [
    ({}, [], True),                                  # nothing but the CPU
    ({}, ['xla_cuda13'], False),                     # a CUDA plugin: JAX picks the GPU
    ({'JAX_PLATFORMS': 'cpu'}, ['xla_cuda13'], True),  # ...unless told otherwise
    ({'JAX_PLATFORMS': 'cuda,cpu'}, [], False),      # the first platform wins
    ({'JAX_PLATFORMS': ' CPU '}, ['libtpu'], True),
    ({'JAX_PLATFORMS': 'tpu'}, [], False),
])
def test_the_restart_is_only_for_cpu_runs(env, plugins, cpu):
  assert hugepages.expects_cpu_backend(env, plugins) is cpu


def test_accelerator_plugins_finds_a_jax_plugins_module_without_importing_it(tmp_path, monkeypatch):
  plugin = tmp_path / 'jax_plugins' / 'xla_fake_accelerator'
  plugin.mkdir(parents=True)
  (plugin / '__init__.py').write_text('raise ImportError("must not be imported")\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  assert 'xla_fake_accelerator' in hugepages.accelerator_plugins()


def test_tunable_value_reads_one_entry_of_the_colon_separated_list():
  env = {'GLIBC_TUNABLES': 'glibc.malloc.check=3:glibc.malloc.hugetlb=0:glibc.malloc.tcache_count=0'}
  assert hugepages.tunable_value(env) == '0'
  assert hugepages.tunable_value({'GLIBC_TUNABLES': 'glibc.malloc.hugetlbx=1'}) is None
  assert hugepages.tunable_value({}) is None


# Mallocs 64 MiB through libc (numpy would madvise huge pages itself) and reports what the kernel backed it with.
_PROBE = '''
import ctypes, json, os, re, sys
from clflax.runtime import hugepages
if __name__ == '__main__':
  hugepages.ensure()
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  block = libc.malloc(64 << 20)
  ctypes.memset(block, 1, 64 << 20)
  with open('/proc/self/smaps_rollup') as f:
    huge_kb = int(re.search(r'AnonHugePages:\\s+(\\d+) kB', f.read()).group(1))
  print(json.dumps({'pid': os.getpid(), 'argv': sys.argv[1:], 'huge_kb': huge_kb,
                    'tunables': os.environ.get('GLIBC_TUNABLES')}))
  sys.exit(int(sys.argv[1]))
'''


def _run_probe(tmp_path, **env_changes):
  script = tmp_path / 'probe.py'
  script.write_text(_PROBE)
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', hugepages.OPT_OUT)}
  env.update(PYTHONPATH=str(_REPO), **env_changes)
  proc = subprocess.Popen([sys.executable, str(script), '7', '--flag=a b'], env=env, stdout=subprocess.PIPE,
                          text=True)
  out, _ = proc.communicate(timeout=60)
  return proc, json.loads(out)


@pytest.mark.skipif(hugepages.thp_mode() != 'madvise' or (hugepages.glibc_version() or (0,)) < hugepages.MIN_GLIBC,
                    reason='needs Linux with THP mode madvise and glibc >= 2.35')
def test_ensure_restarts_the_same_command_with_huge_pages(tmp_path):
  proc, report = _run_probe(tmp_path)
  assert proc.returncode == 7 and report['argv'] == ['7', '--flag=a b']  # Same arguments, exit code passed on.
  assert report['pid'] == proc.pid  # Replaced in place: whoever started it still holds the right process.
  assert report['tunables'] == 'glibc.malloc.hugetlb=1'
  assert report['huge_kb'] >= 32 << 10  # The kernel's own count: most of the 64 MiB block sits in 2-MiB pages.

  proc, report = _run_probe(tmp_path, CLFLAX_HUGEPAGES='0')
  assert proc.returncode == 7 and report['tunables'] is None
  assert report['huge_kb'] < 32 << 10
