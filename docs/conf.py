"""Sphinx configuration of the mac_optax documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html`` (the ``docs``
extra of pyproject.toml). Besides the usual settings, this file

* writes ``api.rst`` from ``mac_optax.__all__``: every public name gets an
  autosummary page from its docstring, grouped by ``API_GROUPS`` below; a new
  public name that no group lists yet still gets a page (under "More"), a
  group entry that is no longer public, or a public name without a
  docstring, stops the build;
* copies ``notebooks/*.ipynb`` into ``docs/notebooks/``, where myst-nb renders
  them with their saved outputs (the tests execute them; the docs build does
  not).
"""

import inspect
import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import mac_optax  # pylint: disable=g-import-not-at-top,wrong-import-position

project = 'mac_optax'
author = 'The mac_optax authors'
copyright = author  # pylint: disable=redefined-builtin
release = mac_optax.__version__
version = release

extensions = [
    'myst_nb',
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.mathjax',
    'sphinx.ext.napoleon',
    'sphinx.ext.viewcode',
]

exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store', '**.ipynb_checkpoints']
source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb',
                 '.ipynb': 'myst-nb'}

# The docstrings are Google style; their examples are doctests, which pytest
# runs (--doctest-modules), so the rendered examples are known to work.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# The Attributes sections say what each field holds; the annotations are on
# the class's signature already.
napoleon_attr_annotations = False
autosummary_generate = True
# Classes list their own documented members only (not tuple's or object's).
templates_path = ['_templates']
autodoc_typehints = 'description'
# Shown by name rather than as the union it stands for.
autodoc_type_aliases = {'jax.typing.ArrayLike': 'jax.typing.ArrayLike'}
autodoc_member_order = 'bysource'
autodoc_default_options = {'members': True, 'show-inheritance': False}
add_module_names = False

myst_enable_extensions = ['dollarmath', 'colon_fence']
myst_heading_anchors = 3
# The notebooks are executed by tests/test_notebooks.py (tiny size) and
# committed with the outputs of a full run: render those, never re-execute.
nb_execution_mode = 'off'

html_theme = 'sphinx_book_theme'
html_title = f'mac_optax {release}'
html_theme_options = {
    'show_toc_level': 2,
    'navigation_with_keys': False,
}

# --------------------------------------------------------------------------
# The API page, from mac_optax.__all__.

API_GROUPS = {
    'Optimizers': [
        'mac', 'mac_adamw', 'preconditioned', 'scale_by_mac',
        'ScaleByMacState', 'precondition', 'input_second_moments',
        'layer_labels',
    ],
    'Training state': ['TrainState', 'TrainStateMixin', 'apply_gradients'],
    'Capturing the statistics': [
        'capture', 'Capture', 'recording', 'with_stats',
        'provide_attention_probabilities',
    ],
    'Which layers': [
        'find_layers', 'Layers', 'LayerSpec', 'summary', 'precondition_mask',
    ],
    'Layer rules': [
        'LayerRule', 'LayerCall', 'Statistic', 'DenseRule', 'ConvRule',
        'ConvTransposeRule', 'ConvLocalRule', 'EinsumRule', 'AttentionRule',
        'PassThrough', 'register_layer', 'register_attention', 'rule_of',
    ],
    'Data parallel, sharding and accumulation': [
        'all_reduce_stats', 'merge_stats', 'state_sharding', 'multi_steps',
        'MultiStepsState', 'stats_accumulator',
    ],
}


def _undocumented(name):
  """Why ``mac_optax.<name>`` has no docstring of its own, or None."""
  obj = getattr(mac_optax, name)
  doc = obj.__doc__ or ''
  if not doc.strip():
    return 'no docstring'
  # NamedTuple and dataclass write a docstring that only repeats the fields.
  if inspect.isclass(obj) and doc.startswith(f'{obj.__name__}('):
    return 'only the generated signature as docstring'
  return None


def _api_page():
  public = list(mac_optax.__all__)
  listed = [name for names in API_GROUPS.values() for name in names]
  stale = sorted(set(listed) - set(public))
  if stale:
    raise RuntimeError(
        f'docs/conf.py API_GROUPS lists {", ".join(stale)}, which'
        ' mac_optax.__all__ no longer has: remove or rename them there.')
  missing_docs = {name: why for name in public
                  if (why := _undocumented(name)) is not None}
  if missing_docs:
    raise RuntimeError(
        'public names without a docstring (the API page is made from them): '
        + ', '.join(f'{name} ({why})' for name, why in missing_docs.items()))
  groups = dict(API_GROUPS)
  more = [name for name in public if name not in listed]
  if more:
    groups['More'] = more
  lines = [
      '..',
      '   Written by docs/conf.py from mac_optax.__all__; edit API_GROUPS',
      '   there, not this file.',
      '',
      'API reference',
      '=============',
      '',
      'Every public name of ``mac_optax`` (its ``__all__``), documented from',
      'its docstring.',
      '',
      '.. currentmodule:: mac_optax',
      '',
  ]
  for title, names in groups.items():
    lines += [title, '-' * len(title), '', '.. autosummary::',
              '   :toctree: _autosummary', '']
    lines += [f'   {name}' for name in names]
    lines.append('')
  return '\n'.join(lines)


def _write_if_changed(path, text):
  # Rewriting an unchanged file would make Sphinx re-read it every build.
  if not path.exists() or path.read_text() != text:
    path.write_text(text)


_write_if_changed(DOCS / 'api.rst', _api_page())

# --------------------------------------------------------------------------
# The notebooks, as saved (with the outputs of a full run).

_notebooks = DOCS / 'notebooks'
_notebooks.mkdir(exist_ok=True)
for _source in sorted((ROOT / 'notebooks').glob('*.ipynb')):
  _target = _notebooks / _source.name
  if not _target.exists() or _target.read_bytes() != _source.read_bytes():
    shutil.copyfile(_source, _target)

# --------------------------------------------------------------------------
# Events.


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """NamedTuple fields are documented by the class's Attributes section."""
  del app, what, name, options
  if (obj.__doc__ or '').startswith('Alias for field number'):
    return True
  return skip


def _readme_links_to_home(app, docname, source):
  """The guides link to ../../README.md as on GitHub; here it is index."""
  del app
  if docname.startswith('guides/'):
    source[0] = source[0].replace('](../../README.md#', '](../index.md#')


def setup(app):
  app.connect('autodoc-skip-member', _skip_namedtuple_fields)
  app.connect('source-read', _readme_links_to_home)
