"""Transparent huge pages for the host memory XLA:CPU allocates on every step.

XLA:CPU allocates an executable's temporary buffer anew on every call (545 MB for the B0 + 3 heads step at 224 px,
batch 8). glibc's malloc serves a block that large with a fresh mmap, so each step faulted in ~137,000 4-KiB pages
and then ran its memory-bound passes (batch norm + activation, the depthwise convolutions) through as many TLB
entries. glibc >= 2.35 can ask the kernel for transparent huge pages on such mappings (the tunable
`glibc.malloc.hugetlb=1`, for kernels whose THP mode is `madvise`): ~450 faults of 2 MiB per step instead, and the
B0 steps ran 15-39% faster on a 2-core CPU, with bit-identical results (docs/performance.md). With the mode `always`
the kernel does this by itself; with `never` nothing can.

glibc reads its tunables once, when the process starts, so `ensure()` re-executes the running Python command
with `GLIBC_TUNABLES` extended, before anything heavy is imported (`launch.py`, `python -m clflax.bench`).
Programs that import clflax as a library set it themselves: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python ...`.
`CLFLAX_HUGEPAGES=0` turns the restart off; an explicit `glibc.malloc.hugetlb` setting is always left as it is.
The restart happens only where JAX will run on the CPU (`expects_cpu_backend`: `JAX_PLATFORMS` names cpu first, or
it is unset and no accelerator plugin is installed); GPU / TPU steps keep their buffers in device memory.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys
from typing import Mapping, Optional, Sequence

TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT = 'CLFLAX_HUGEPAGES'  # '0': never restart the process for huge pages.
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'
MIN_GLIBC = (2, 35)  # The first glibc with the tunable; older ones ignore it.
ACCELERATOR_MODULES = ('libtpu',)  # Backends JAX finds as modules rather than as `jax_plugins`.


def accelerator_plugins() -> list[str]:
  """The accelerator backends JAX would find (CUDA / ROCm plugins, libtpu), without importing JAX or them."""
  names = [ep.name for ep in importlib.metadata.entry_points(group='jax_plugins')]
  spec = importlib.util.find_spec('jax_plugins')
  if spec is not None and spec.submodule_search_locations:
    names += [m.name for m in pkgutil.iter_modules(list(spec.submodule_search_locations))]
  names += [m for m in ACCELERATOR_MODULES if importlib.util.find_spec(m) is not None]
  return sorted(set(names))


def expects_cpu_backend(environ: Mapping[str, str], plugins: Sequence[str]) -> bool:
  """Whether JAX will run on the CPU: `JAX_PLATFORMS` (comma-separated, first one wins) says so, or it is unset and
  no accelerator plugin is installed. (A machine with a CUDA plugin but no GPU then runs on the CPU without the
  restart: set JAX_PLATFORMS=cpu there.)"""
  platforms = [p.strip().lower() for p in environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  if platforms:
    return platforms[0] == 'cpu'
  return not plugins


def thp_mode(path: str = THP_MODE_FILE) -> Optional[str]:
  """The kernel's THP mode ('always', 'madvise' or 'never': the bracketed word of `path`), None if unreadable."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> Optional[tuple[int, ...]]:
  """(major, minor) of the C library this Python runs on, None if it is not glibc."""
  name, version = platform.libc_ver()
  if name != 'glibc' or not version:
    return None
  return tuple(int(part) for part in version.split('.')[:2] if part.isdigit())


def tunable_value(environ: Mapping[str, str]) -> Optional[str]:
  """The value of `glibc.malloc.hugetlb` in environ's GLIBC_TUNABLES (colon-separated name=value), None if unset."""
  for item in environ.get('GLIBC_TUNABLES', '').split(':'):
    name, _, value = item.partition('=')
    if name == TUNABLE:
      return value
  return None


def tuned_environ(environ: Mapping[str, str], mode: Optional[str],
                  glibc: Optional[tuple[int, ...]]) -> Optional[dict[str, str]]:
  """The environment to restart with (GLIBC_TUNABLES extended by `glibc.malloc.hugetlb=1`), or None when a restart
  would change nothing: not glibc >= 2.35, THP mode not 'madvise', opted out, or the tunable already set."""
  if glibc is None or glibc < MIN_GLIBC or mode != 'madvise':
    return None
  if environ.get(OPT_OUT) == '0' or tunable_value(environ) is not None:
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  return {**environ, 'GLIBC_TUNABLES': f'{tunables}:{TUNABLE}=1' if tunables else f'{TUNABLE}=1'}


def status(environ: Mapping[str, str] = os.environ) -> str:
  """One line saying whether this process's large allocations get huge pages, and why not if they do not."""
  mode, glibc = thp_mode(), glibc_version()
  if mode == 'always':
    return 'huge pages: on (kernel THP mode always)'
  if mode != 'madvise':
    return f'huge pages: off (kernel THP mode {mode or "unknown"})'
  if glibc is None or glibc < MIN_GLIBC:
    return 'huge pages: off (needs glibc >= 2.35)'
  value = tunable_value(environ)
  if value not in (None, '0'):
    return f'huge pages: on ({TUNABLE}={value})'
  return f'huge pages: off (set GLIBC_TUNABLES={TUNABLE}=1 before Python starts; CPU steps ran 15-39% faster with it)'


def ensure() -> None:
  """Re-executes this Python command (same interpreter, options and arguments: `sys.orig_argv`, same process id)
  with huge pages on, when that would change something; otherwise returns. Call it first thing in a script's
  `__main__` block, never from a library function: the process is replaced."""
  environ = tuned_environ(os.environ, thp_mode(), glibc_version())
  if environ is None or sys.platform != 'linux' or not expects_cpu_backend(os.environ, accelerator_plugins()):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environ)
