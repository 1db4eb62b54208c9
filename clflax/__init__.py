"""clflax: continual learning in JAX/Flax, with strategies as pure pytree functions composed into optax transforms.

Library entry points: `clflax.strategies` (the strategies and their `Strategy` values), `clflax.trainer.train`
(`train_and_evaluate(config, workdir)`), `clflax.configs` (config builders), `clflax.models`, `clflax.data`.
The command line is `clflax --config FILE[:arg]` (clflax/cli.py).
"""
__version__ = '0.2.0'
