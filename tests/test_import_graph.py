"""The package's import graph: no cycle (deferred imports inside functions count too), and the library never
imports its tools (clflax.bench) or the repository's (tools/, configs/)."""
import ast
import pathlib

import clflax

PACKAGE = pathlib.Path(clflax.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for path in PACKAGE.rglob('*.py'):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    found['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return found


def _imports(path: pathlib.Path, modules: dict) -> set[str]:
  """The clflax modules `path` imports anywhere in it (a package's `__init__` importing its own modules is how a
  package exports them, not a cycle: only the module a name comes from counts)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:  # `from a import b` imports the module a.b when there is one, else a's name b.
        full = f'{node.module}.{alias.name}'
        out.add(full if full in modules else node.module)
  return {name for name in out if name in modules or name.split('.')[0] in ('tools', 'configs')}


def _graph():
  modules = _modules()
  return {name: _imports(path, modules) for name, path in modules.items()}


def _cycle(graph):
  """One import cycle as a list of modules, or None (depth-first search with colours)."""
  colour, stack = {}, []

  def visit(node):
    colour[node] = 'grey'
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if nxt not in graph:
        continue
      if colour.get(nxt) == 'grey':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in colour:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    colour[node] = 'black'
    return None

  for node in sorted(graph):
    if node not in colour:
      found = visit(node)
      if found:
        return found
  return None


def test_the_import_graph_has_no_cycle():
  graph = _graph()
  assert len(graph) > 50  # Every module was found.
  assert _cycle(graph) is None, ' -> '.join(_cycle(graph))


def test_the_cycle_finder_finds_one():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None


def test_the_library_imports_no_tool():
  for module, imported in _graph().items():
    if module.startswith('clflax.bench'):
      continue
    tools = {name for name in imported if name.startswith(('clflax.bench', 'tools', 'configs'))}
    assert not tools, f'{module} imports {sorted(tools)}'
