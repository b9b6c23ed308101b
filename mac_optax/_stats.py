"""The ``mac_stats`` tree: per-layer statistics that can be merged exactly.

Every preconditioned layer has one node at its module path holding weighted
means. Each mean comes with the count of rows behind it, so that means over
several calls, micro-batches, devices or hosts combine into the mean over all
of their rows, exactly as if the whole batch had been seen at once:

* ``mean_input``: the mean input row ``ā`` (weight ``rows``), the statistic
  the preconditioner uses.
* For the reference attention value statistic ``v = Σ_j p̄_j x̄_j``, which is
  a product of two means and therefore not itself mergeable, its factors:
  ``key_attention`` (``p̄``, the attention each key receives averaged over
  query rows, weight ``rows``) and ``position_input`` (``x̄``, the value input
  at each key position averaged over examples, weight ``examples``).
  ``mean_input`` is recomputed from them after every merge.

Layers stacked by ``nn.scan`` carry the stacked axes in front of every field.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

MEAN = 'mean_input'
ROWS = 'rows'
KEY_ATTENTION = 'key_attention'
POSITION_INPUT = 'position_input'
EXAMPLES = 'examples'

# Which count weighs each mean.
_WEIGHT_OF = {MEAN: ROWS, KEY_ATTENTION: ROWS, POSITION_INPUT: EXAMPLES}
_COUNTS = (ROWS, EXAMPLES)
FIELDS = frozenset(_WEIGHT_OF) | frozenset(_COUNTS)

Path = tuple[Any, ...]


def path_str(path: Path) -> str:
  return '/'.join(map(str, path)) if path else '<root>'


def is_layer_node(node: Any) -> bool:
  return isinstance(node, Mapping) and MEAN in node


def value_mean(key_attention: jax.Array, position_input: jax.Array):
  """``v = Σ_j p̄_j x̄_j`` over the key axis, stacked axes kept."""
  return jnp.einsum('...n,...nd->...d', key_attention, position_input)


def _expand(weight: jax.Array, like: jax.Array) -> jax.Array:
  """Count of shape ``stack`` broadcast against a mean ``stack + (...)``."""
  return weight.reshape(weight.shape + (1,) * (like.ndim - weight.ndim))


def _divide(summed: jax.Array, total: jax.Array) -> jax.Array:
  total = _expand(total, summed)
  return jnp.where(total > 0, summed / jnp.where(total > 0, total, 1.0), 0.0)


def _weighted_mean(means, weights, total):
  return _divide(sum(m * _expand(w, m) for m, w in zip(means, weights)), total)


def _mergeable(entries: Sequence[Mapping[str, jax.Array]], field: str) -> bool:
  shapes = {jnp.shape(e[field]) for e in entries if field in e}
  return len(shapes) == 1 and all(field in e for e in entries)


def merge_layer(
    entries: Sequence[Mapping[str, jax.Array]],
) -> dict[str, jax.Array]:
  """Merges one layer's statistics from several calls or batches.

  The result is the statistic of all their rows together. A reference value
  statistic whose factors cannot be stacked (the layer was called on sequences
  of different lengths) falls back to the row-weighted mean of ``mean_input``.
  """
  if len(entries) == 1:
    return dict(entries[0])
  ones = jnp.ones([], jnp.float32)
  result = {}
  for count in _COUNTS:
    if all(count in e for e in entries):
      result[count] = sum(e[count] for e in entries)
  rows = [e.get(ROWS, ones) for e in entries]
  total_rows = result.get(ROWS, sum(rows))
  if _mergeable(entries, KEY_ATTENTION) and _mergeable(entries, POSITION_INPUT):
    result[KEY_ATTENTION] = _weighted_mean(
        [e[KEY_ATTENTION] for e in entries], rows, total_rows)
    result[POSITION_INPUT] = _weighted_mean(
        [e[POSITION_INPUT] for e in entries], [e[EXAMPLES] for e in entries],
        result[EXAMPLES])
    result[MEAN] = value_mean(result[KEY_ATTENTION], result[POSITION_INPUT])
  else:
    result.pop(EXAMPLES, None)
    result[MEAN] = _weighted_mean([e[MEAN] for e in entries], rows, total_rows)
  return result


def map_layers(fn: Callable[[Path, Any], Any], stats: Any, *rest: Any) -> Any:
  """Applies ``fn(path, node, *rest_nodes)`` to every layer node of the trees."""

  def walk(path, node, others):
    if is_layer_node(node):
      return fn(path, node, *others)
    if not isinstance(node, Mapping):
      raise ValueError(
          f'mac_stats entry {path_str(path)} is not a {MEAN!r} statistic;'
          ' pass the statistics returned by mac_optax.capture unchanged.'
      )
    return {
        key: walk(path + (key,), child, [o[key] for o in others])
        for key, child in node.items()
    }

  return walk((), stats, list(rest))


def merge(trees: Sequence[Any]) -> Any:
  """Merges whole ``mac_stats`` trees, e.g. of micro-batches.

  The trees must hold the same layers. The result equals the statistics of
  all their batches at once, weighted by each layer's row counts.
  """
  if not trees:
    raise ValueError('merge needs at least one mac_stats tree.')
  return map_layers(lambda _, *nodes: merge_layer(nodes), trees[0], *trees[1:])


def all_reduce(stats: Any, axis_name: Any) -> Any:
  """Merges the statistics of all devices along a ``shard_map``/``pmap`` axis.

  Every mean is summed with its count over ``axis_name`` (``lax.psum``) and
  divided by the total count, so each device ends up with the global-batch
  statistic, even when devices saw different numbers of (unmasked) rows.
  """

  def reduce(_, node):
    ones = jnp.ones([], jnp.float32)
    result = {c: jax.lax.psum(node[c], axis_name) for c in _COUNTS if c in node}
    for field, weight_name in _WEIGHT_OF.items():
      if field not in node or (field == MEAN and KEY_ATTENTION in node):
        continue
      weight = node.get(weight_name, ones)
      total = result.get(weight_name)
      if total is None:
        total = jax.lax.psum(weight, axis_name)
      summed = jax.lax.psum(node[field] * _expand(weight, node[field]),
                            axis_name)
      result[field] = _divide(summed, total)
    if KEY_ATTENTION in node:
      result[MEAN] = value_mean(result[KEY_ATTENTION], result[POSITION_INPUT])
    return result

  return map_layers(reduce, stats)


def mean_inputs(stats: Any) -> dict[Path, jax.Array]:
  """Module path -> ``mean_input`` for every layer of a ``mac_stats`` tree."""
  flat = {}

  def collect(path, node):
    unknown = set(node) - FIELDS
    if unknown:
      raise ValueError(
          f'mac_stats entry {path_str(path)} has unknown fields'
          f' {sorted(unknown)}; pass the statistics returned by'
          ' mac_optax.capture unchanged.'
      )
    flat[path] = node[MEAN]
    return node

  map_layers(collect, stats)
  return flat
