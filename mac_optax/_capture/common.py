"""What the linen and NNX capture share beyond the tracker.

The statistics of several model calls merged into one tree, the error of a
capture that found kernels but made no statistic, and the shape-only trace
with which ``find_layers`` runs any kind of model.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax

from mac_optax import _stats
from mac_optax._capture import tracking

Path = _stats.Path
path_str = _stats.path_str


def merge_trees(trees: list[Any]) -> Any:
  """Merges ``mac_stats`` trees; a layer in several merges its statistics.

  A layer appears in several trees when its model is called more than once
  (two views of a batch): it gets the statistic of all those calls' rows.
  """
  flat: dict[Path, list] = {}
  for tree in trees:
    _stats.map_layers(
        lambda path, node: flat.setdefault(path, []).append(node), tree)
  return _stats.nest_nodes({path: _stats.merge_layer(nodes)
                      for path, nodes in flat.items()})


def describe_modules(paths, module_types: Mapping[Path, str]) -> str:
  """``'a/b (Type), c (not called)'`` for error messages."""
  return ', '.join(
      f'{path_str(p)} ({module_types.get(p, "not called")})' for p in paths)


def no_statistics_error(what: str, owners, module_types) -> ValueError:
  """The error for a capture that found kernels but recorded nothing."""
  return ValueError(
      f'{what}, but no layer MAC knows ran, so MAC would train as plain'
      ' momentum. Modules owning a kernel:'
      f' {describe_modules(owners, module_types)}. Teach MAC their layer'
      ' classes with mac_optax.register_layer (or register_attention), or'
      ' pass allow_empty=True to accept no statistics.'
  )


def _unbound_axis_name(error: NameError) -> str | None:
  """The axis name of JAX's 'unbound axis name: <name>' error, or None."""
  found = re.search(r'unbound axis name:? ([^\s.]+)', str(error))
  return found.group(1) if found else None


def eval_shape(fn: Callable[..., Any], *operands,
               survey: tracking.Survey):
  """``jax.eval_shape(fn, *operands)``, binding unbound collective axes.

  A collective over an axis name that only ``pmap``/``shard_map`` would bind
  (``BatchNorm(axis_name='batch')``'s mean) raises ``NameError`` outside of
  them. Each such name is bound by an enclosing ``jax.vmap`` of size 1 and the
  trace rerun (``survey`` emptied first); the leading axes that these add
  to the outputs are stripped again.
  """
  names: list[str] = []
  while True:
    traced = fn
    for name in names:
      traced = jax.vmap(traced, in_axes=None, axis_size=1, axis_name=name)
    try:
      outputs = jax.eval_shape(traced, *operands)
    except NameError as error:
      name = _unbound_axis_name(error)
      if name is None or name in names:
        raise
      names.append(name)
      survey.clear()
      continue
    if not names:
      return outputs
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape[len(names):], leaf.dtype),
        outputs)
