"""`python -m clflax.bench`: see clflax/bench/run.py."""
from clflax.bench import run

if __name__ == '__main__':
  run.main()
