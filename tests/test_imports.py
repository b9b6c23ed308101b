"""The package's layers: no import cycle, and an optimizer without capture.

The import graph is read from the source with ``ast`` (imports inside
functions count too, so a cycle cannot hide in a deferred import), and the
optimizer modules are also imported for real, in a fresh interpreter, to see
that no module of ``mac_optax._capture`` comes with them. Each check is first
shown to fail on a small package made to break it.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / 'mac_optax'
PACKAGE = 'mac_optax'
CAPTURE = 'mac_optax._capture'
# Not part of the library: the demo imports the package from outside.
EXCLUDED = ('mac_optax.demo',)

# The optimizer side: every module at the top level of the package but its
# __init__ (which gathers the public names of both sides). They read layers
# through _geometry and statistics through _stats, never through the Flax
# capture code, so that the optimizer reads, imports and tests without it.
OPTIMIZER_MODULES = (
    '_accumulation',
    '_alias',
    '_batching',
    '_boxes',
    '_ema',
    '_geometry',
    '_hyperparameters',
    '_preconditioner',
    '_presets',
    '_second_moments',
    '_sharding',
    '_stats',
    '_train_state',
    '_transform',
)


def _module_files(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
  """Every module of the package under ``root``, by dotted name."""
  files = {}
  for path in sorted(root.rglob('*.py')):
    parts = path.relative_to(root).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    name = '.'.join((package,) + parts)
    if not any(name == e or name.startswith(e + '.') for e in EXCLUDED):
      files[name] = path
  return files


def _import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
  """Module -> the package's modules it imports, anywhere in its source.

  ``from a import b`` is an edge to ``a.b`` when that is a module, else to
  ``a``. Running a package's ``__init__`` before its submodules is Python's
  doing, not an import the code makes, so it is no edge.
  """
  files = _module_files(root, package)
  graph = {}
  for name, path in files.items():
    is_package = path.name == '__init__.py'
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          anchor = name.split('.')
          anchor = anchor[:len(anchor) - node.level + is_package]
          base = '.'.join(anchor + ([base] if base else []))
        targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in files
                   else base for alias in node.names]
      else:
        continue
      for target in targets:
        # `import a.b.c` imports a.b.c; keep the deepest known module.
        while target and target not in files:
          target = target.rpartition('.')[0]
        if target and target != name:
          edges.add(target)
    graph[name] = edges
  return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of the graph as ``[a, b, ..., a]``, or None."""
  done, stack, on_stack = set(), [], set()

  def visit(node):
    stack.append(node)
    on_stack.add(node)
    for child in sorted(graph.get(node, ())):
      if child in on_stack:
        return stack[stack.index(child):] + [child]
      if child not in done:
        found = visit(child)
        if found:
          return found
    stack.pop()
    on_stack.discard(node)
    done.add(node)
    return None

  for node in sorted(graph):
    if node not in done:
      found = visit(node)
      if found:
        return found
  return None


def _import_chain(graph, start: str, prefix: str) -> list[str] | None:
  """A chain of imports from ``start`` to a module under ``prefix``, or None."""
  parents, frontier = {start: None}, [start]
  while frontier:
    node = frontier.pop(0)
    if node == prefix or node.startswith(prefix + '.'):
      chain = []
      while node is not None:
        chain.append(node)
        node = parents[node]
      return chain[::-1]
    for child in sorted(graph.get(node, ())):
      if child not in parents:
        parents[child] = node
        frontier.append(child)
  return None


_LOADER = textwrap.dedent('''
    import importlib, json, sys, types
    root, package, prefix, names = json.loads(sys.argv[1])
    # The package without its __init__ (which imports both sides), so that
    # only what the named modules import themselves is loaded.
    stub = types.ModuleType(package)
    stub.__path__ = [root]
    sys.modules[package] = stub
    loaded = {}
    for name in names:
      before = set(sys.modules)
      importlib.import_module(package + '.' + name)
      loaded[name] = sorted(
          m for m in set(sys.modules) - before
          if m == prefix or m.startswith(prefix + '.'))
    print(json.dumps(loaded))
''')


def _loaded_capture_modules(root: pathlib.Path, package: str, prefix: str,
                            names) -> dict[str, list[str]]:
  """Per module, what of ``prefix`` importing it loads (fresh interpreter).

  A module imported after others is charged only with what it loads anew.
  """
  argument = json.dumps([str(root), package, prefix, list(names)])
  result = subprocess.run(
      [sys.executable, '-c', _LOADER, argument], capture_output=True,
      text=True, check=False, cwd=root.parent, timeout=600)
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def graph():
  return _import_graph(ROOT, PACKAGE)


def test_the_graph_sees_every_module_and_the_capture_edges(graph):
  assert f'{CAPTURE}.linen' in graph and f'{PACKAGE}._transform' in graph
  assert not any(name.startswith('mac_optax.demo') for name in graph)
  # The package imports the capture code through its front door only, which
  # imports both frameworks.
  assert CAPTURE in graph[PACKAGE]
  assert {f'{CAPTURE}.linen', f'{CAPTURE}.nnx'} <= graph[CAPTURE]


def test_import_graph_has_no_cycle(graph):
  cycle = _find_cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_linen_and_nnx_capture_do_not_import_each_other(graph):
  linen, nnx = f'{CAPTURE}.linen', f'{CAPTURE}.nnx'
  assert _import_chain(graph, linen, nnx) is None
  assert _import_chain(graph, nnx, linen) is None


def test_every_top_level_module_is_on_the_optimizer_side():
  top_level = {path.stem for path in ROOT.glob('*.py')} - {'__init__'}
  assert top_level - set(OPTIMIZER_MODULES) == set(), (
      'new top-level modules: add them to OPTIMIZER_MODULES (or, if they'
      ' are capture code, move them into mac_optax/_capture/)')
  assert set(OPTIMIZER_MODULES) - top_level == set(), (
      'OPTIMIZER_MODULES lists modules that no longer exist')


@pytest.mark.parametrize('module', OPTIMIZER_MODULES)
def test_optimizer_module_imports_no_capture_module(graph, module):
  chain = _import_chain(graph, f'{PACKAGE}.{module}', CAPTURE)
  assert chain is None, 'imports capture code: ' + ' -> '.join(chain)


def test_importing_optimizer_modules_loads_no_capture_module():
  loaded = _loaded_capture_modules(ROOT, PACKAGE, CAPTURE, OPTIMIZER_MODULES)
  assert set(loaded) == set(OPTIMIZER_MODULES)
  assert {name: found for name, found in loaded.items() if found} == {}


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_the_checks_fail_on_a_cycle_and_on_an_optimizer_importing_capture(
    tmp_path):
  """A package with a deferred-import cycle and two leaky optimizer modules."""
  root = tmp_path / 'toy'
  _write(root, {
      '__init__.py': 'from toy import _opt\nfrom toy import _capture\n',
      '_opt.py': '''
          def late():
            from toy._capture import b  # deferred: only the graph sees it
            return b
      ''',
      '_leak.py': 'from toy import _helper\n',
      '_helper.py': 'from . import _capture\n',
      '_capture/__init__.py': 'from toy._capture import a\n',
      '_capture/a.py': 'import toy._capture.b\n',
      '_capture/b.py': '''
          def late():
            from toy._capture import a
            return a
      ''',
  })
  toy_graph = _import_graph(root, 'toy')
  assert toy_graph['toy._helper'] == {'toy._capture'}
  assert _find_cycle(toy_graph) == ['toy._capture.a', 'toy._capture.b',
                                    'toy._capture.a']
  assert _import_chain(toy_graph, 'toy._opt', 'toy._capture') == [
      'toy._opt', 'toy._capture.b']
  assert _import_chain(toy_graph, 'toy._leak', 'toy._capture') == [
      'toy._leak', 'toy._helper', 'toy._capture']
  loaded = _loaded_capture_modules(root, 'toy', 'toy._capture',
                                   ['_opt', '_leak'])
  assert loaded == {'_opt': [], '_leak': ['toy._capture', 'toy._capture.a',
                                          'toy._capture.b']}
