r"""Runs a clflax experiment: `python launch.py --config configs/agem.py` (the same as the `clflax` command).

Flags: --config configs/x.py[:arg] (override any field with --config.a.b=value), --workdir (default
runs/<config name>[_<arg>]; rerunning the same command resumes), --fresh, --debug, --verbosity (clflax/cli.py).
"""
from clflax import cli

if __name__ == '__main__':
  cli.main()
