"""`python -m clflax --config FILE[:arg]`: the `clflax` command (clflax/cli.py)."""
from clflax import cli

if __name__ == '__main__':
  cli.main()
