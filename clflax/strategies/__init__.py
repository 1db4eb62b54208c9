"""Continual-learning strategies: pure functions of pytrees, optax transforms, and one `Strategy` value each.

agem, ewc, si, mas, l2, gem, tagem: gradient transforms (penalties / projections) chained by `registry.build_tx`;
packnet, progressive: transforms after the base optimizer; replay (episodic memories and ER), der, lwf: loss terms;
mer: an update of its own. `base` defines the Strategy interface; `registry` maps names to strategies.
"""
from clflax.strategies import agem
from clflax.strategies import base
from clflax.strategies import der
from clflax.strategies import ewc
from clflax.strategies import gem
from clflax.strategies import l2
from clflax.strategies import lwf
from clflax.strategies import mas
from clflax.strategies import mer
from clflax.strategies import packnet
from clflax.strategies import progressive
from clflax.strategies import registry
from clflax.strategies import replay
from clflax.strategies import si
from clflax.strategies import tagem

__all__ = ['agem', 'base', 'der', 'ewc', 'gem', 'l2', 'lwf', 'mas', 'mer', 'packnet', 'progressive', 'registry',
           'replay', 'si', 'tagem']
