"""The layout's rules that a reader relies on: the library's imports form no cycle (lazy imports inside functions
included), and the production code carries no test hooks (no environment variable read by the train step)."""
import ast
import os

import pytest

_ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
_PACKAGE = 'immiscible_jax'


def _modules():
  """{dotted module name: file path} of every module of the package."""
  out = {}
  for folder, _, files in os.walk(os.path.join(_ROOT, _PACKAGE)):
    for name in files:
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(folder, name), _ROOT)[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = os.path.join(folder, name)
  return out


def import_graph():
  """{module: set of package modules it imports anywhere in its file, at the top or inside a function}."""
  modules = _modules()
  graph = {}
  for module, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names if a.name in modules)
      elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(_PACKAGE):
        for alias in node.names:  # `from a.b import c` imports a.b.c when c is a module, else a.b itself
          sub = f'{node.module}.{alias.name}'
          deps.add(sub if sub in modules else node.module)
    deps.discard(module)
    graph[module] = deps
  return graph


def find_cycle(graph):
  """One import cycle as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == 'open':
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        cycle = visit(dep)
        if cycle:
          return cycle
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert 'immiscible_jax.train' in graph and 'immiscible_jax.train_state' in graph['immiscible_jax.train']
  cycle = find_cycle(graph)
  assert cycle is None, ' -> '.join(cycle)
  # The evaluator is handed to the trainer by its caller: the trainer does not import evaluation.runs.
  assert 'immiscible_jax.evaluation.runs' in graph
  assert 'immiscible_jax.evaluation.runs' not in graph['immiscible_jax.train']


def test_the_library_imports_nothing_from_tools():
  # tools/ (converters, the config reference) is not installed with the library: the library never imports it.
  for module, path in _modules().items():
    for node in ast.walk(ast.parse(open(path).read(), path)):
      names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
          [node.module or ''] if isinstance(node, ast.ImportFrom) else [])
      assert not any(n == 'tools' or n.startswith('tools.') for n in names), f'{module} imports {names}'


def test_the_cycle_finder_finds_a_lazy_import_cycle():
  # runs -> train (at the top) and train -> runs (inside a function): an import inside a function
  # closes a cycle too.
  graph = {'runs': {'train'}, 'train': {'runs', 'data'}, 'data': set()}
  assert find_cycle(graph) == ['runs', 'train', 'runs']


@pytest.mark.parametrize('path', ['train.py', 'train_state.py', 'checkpointing.py', 'consistency.py'])
def test_training_code_reads_no_environment_variable(path):
  tree = ast.parse(open(os.path.join(_ROOT, _PACKAGE, path)).read())
  names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
  assert not names & {'environ', 'getenv'}, f'{path} reads the environment'
