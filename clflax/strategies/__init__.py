"""Continual-learning strategies as pure functions and optax transforms.

agem, ewc, si, mas, l2: gradient transforms (penalties / projection) chained
by `registry.build_tx`; replay: jittable episodic memories; lwf: distillation
losses. See each module's docstring.
"""
from clflax.strategies import agem
from clflax.strategies import ewc
from clflax.strategies import l2
from clflax.strategies import lwf
from clflax.strategies import mas
from clflax.strategies import registry
from clflax.strategies import replay
from clflax.strategies import si

__all__ = ['agem', 'ewc', 'l2', 'lwf', 'mas', 'registry', 'replay', 'si']
