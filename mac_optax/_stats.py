"""The ``mac_stats`` tree: per-layer statistics that merge exactly.

Every preconditioned layer has one node at its module path. Its fields are
weighted means, each with the count of rows behind it, so that the statistics
of several calls, micro-batches, devices or hosts merge into the statistics of
all their rows at once:

* ``mean_input`` (weight ``rows``): the mean input row ``ā``, the statistic the
  preconditioner uses, shape ``(..., [blocks,] d)``.
* The reference attention value statistic ``v = Σ_j p̄_j x̄_j`` is a product
  of two means, so its factors are kept and ``v`` is recomputed after every
  merge: ``key_attention`` (``p̄``, the attention each key receives averaged
  over unmasked query rows, weight ``query_rows``) and ``position_input``
  (``x̄``, the value input at each key position averaged over examples,
  weight ``examples``).
* A fused query/key/value projection needs two statistics: ``plain_input``
  (weight ``rows``) for its query and key blocks and ``value_input`` for its
  value blocks (weight ``query_rows``; from the factors above in the
  reference form). ``block_source`` says which one each output block uses
  (-1: plain, h >= 0: row h of ``value_input``), and ``mean_input`` is
  assembled from them.

Layers stacked by ``nn.scan`` carry the stacked axes in front of every field.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from mac_optax import _geometry

MEAN = 'mean_input'
ROWS = 'rows'
PLAIN = 'plain_input'
VALUE = 'value_input'
KEY_ATTENTION = 'key_attention'
POSITION_INPUT = 'position_input'
QUERY_ROWS = 'query_rows'
EXAMPLES = 'examples'
BLOCK_SOURCE = 'block_source'

# The count that weighs each mean, when the mean is not derived from others.
_WEIGHT_OF = {
    MEAN: ROWS,
    PLAIN: ROWS,
    VALUE: QUERY_ROWS,
    KEY_ATTENTION: QUERY_ROWS,
    POSITION_INPUT: EXAMPLES,
}
_COUNTS = (ROWS, QUERY_ROWS, EXAMPLES)
_FACTORS = (KEY_ATTENTION, POSITION_INPUT, EXAMPLES)
FIELDS = frozenset(_WEIGHT_OF) | frozenset(_COUNTS) | {BLOCK_SOURCE}

Path = _geometry.Path
path_str = _geometry.path_str


def is_layer_node(node: Any) -> bool:
  return isinstance(node, Mapping) and MEAN in node


def value_mean(key_attention: jax.Array, position_input: jax.Array):
  """``v = Σ_j p̄_j x̄_j`` over the key axis, stacked axes kept."""
  # A sum of products, not einsum: XLA:CPU compiles every unfused dot as a
  # kernel of its own, one per attention layer, but equal fusions once.
  return jnp.sum(key_attention[..., None] * position_input, axis=-2)


def _derived(node: Mapping[str, Any]) -> set[str]:
  derived = set()
  if KEY_ATTENTION in node:
    derived.add(VALUE if BLOCK_SOURCE in node else MEAN)
  if BLOCK_SOURCE in node:
    derived.add(MEAN)
  return derived


def rebuild(node: dict[str, Any]) -> dict[str, Any]:
  """Recomputes the derived fields of a layer node from its primary ones."""
  if KEY_ATTENTION in node:
    value = value_mean(node[KEY_ATTENTION], node[POSITION_INPUT])
    if BLOCK_SOURCE in node:
      node[VALUE] = value[..., None, :]
    else:
      node[MEAN] = value
  if BLOCK_SOURCE in node:
    table = jnp.concatenate([node[PLAIN][..., None, :], node[VALUE]], axis=-2)
    index = (node[BLOCK_SOURCE] + 1)[..., None]
    node[MEAN] = jnp.take_along_axis(table, index, axis=-2)
  return node


def _expand(weight: jax.Array, like: jax.Array) -> jax.Array:
  """A count of shape ``stack`` broadcast against a mean ``stack + (...)``."""
  weight = jnp.asarray(weight)
  return weight.reshape(weight.shape + (1,) * (like.ndim - weight.ndim))


def _divide(summed: jax.Array, total: jax.Array) -> jax.Array:
  total = _expand(total, summed)
  return jnp.where(total > 0, summed / jnp.where(total > 0, total, 1.0), 0.0)


def _reduce_node(node, weighted_sum: Callable, total: Callable):
  """Merging: counts add up, primary means are count-weighted averages.

  ``total(node, name)`` is the merged count ``name``, or the number of parts
  merged for ``None`` (the weight of a mean that came without its count).
  """
  result = {c: total(node, c) for c in _COUNTS if c in node}
  if BLOCK_SOURCE in node:
    result[BLOCK_SOURCE] = node[BLOCK_SOURCE]
  derived = _derived(node)
  for field, weight_name in _WEIGHT_OF.items():
    if field in node and field not in derived:
      weight_total = result.get(weight_name)
      if weight_total is None:
        weight_total = total(node, None)
      result[field] = _divide(weighted_sum(node, field, weight_name),
                              weight_total)
  return rebuild(result)


def merge_layer(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Merges one layer's statistics from several calls or batches.

  The result is the statistic of all their rows together. Reference value
  factors that cannot be stacked (the layer saw sequences of different
  lengths) are dropped, and the value statistics merge by their row counts.
  """
  if len(entries) == 1:
    return dict(entries[0])
  entries = [dict(e) for e in entries]
  if len({jnp.shape(e[POSITION_INPUT]) if POSITION_INPUT in e else None
           for e in entries}) > 1:
    for entry in entries:
      for field in _FACTORS:
        entry.pop(field, None)
  fields = set(entries[0])
  for entry in entries[1:]:
    fields &= set(entry)
  entries = [{k: e[k] for k in fields} for e in entries]
  ones = jnp.ones([], jnp.float32)

  def weighted_sum(_, field, weight_name):
    return sum(e[field] * _expand(e.get(weight_name, ones), e[field])
               for e in entries)

  def total(_, count):
    if count is None:
      return jnp.asarray(len(entries), jnp.float32)
    return sum(e[count] for e in entries)

  return _reduce_node(entries[0], weighted_sum, total)


def map_layers(fn: Callable[..., Any], stats: Any, *rest: Any) -> Any:
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
  all their batches at once, each layer weighted by its row counts.

  Args:
    trees: ``mac_stats`` trees from :func:`mac_optax.capture`.

  Returns:
    One ``mac_stats`` tree.
  """
  if not trees:
    raise ValueError('merge needs at least one mac_stats tree.')
  return map_layers(lambda _, *nodes: merge_layer(nodes), trees[0], *trees[1:])


def all_reduce(stats: Any, axis_name: Any) -> Any:
  """Merges the statistics of all devices along a ``shard_map``/``pmap`` axis.

  Every mean is summed with its count over ``axis_name`` (``lax.psum``) and
  divided by the total count, so each device ends up with the global-batch
  statistic, even when devices saw different numbers of (unmasked) rows.

  Args:
    stats: this device's ``mac_stats``.
    axis_name: the mapped axis (or axes) to merge over.

  Returns:
    The global ``mac_stats``, equal on every device.
  """
  ones = jnp.ones([], jnp.float32)

  def weighted_sum(node, field, weight_name):
    weight = node.get(weight_name, ones)
    return jax.lax.psum(node[field] * _expand(weight, node[field]), axis_name)

  def total(node, count):
    return jax.lax.psum(ones if count is None else node[count], axis_name)

  return map_layers(
      lambda _, node: _reduce_node(node, weighted_sum, total), stats
  )


def nest_nodes(flat: Mapping[Path, Mapping[str, Any]]) -> dict:
  """{module path: {field: value}} -> nested dicts keyed like the params."""
  tree: dict = {}
  for path, fields in flat.items():
    node = tree
    for key in path:
      node = node.setdefault(key, {})
    node.update(fields)
  return tree


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


def row_counts(stats: Any) -> dict[Path, list[jax.Array]]:
  """Module path -> the counts behind each layer's statistic.

  These are the ``rows``, ``query_rows`` and ``examples`` fields a layer node
  carries (none for a hand-made node with only ``mean_input``). A count of 0
  means that the statistic saw no rows: an empty batch, or attention whose
  every query is masked, whose value statistic is then all zeros.
  """
  flat = {}

  def collect(path, node):
    flat[path] = [node[c] for c in _COUNTS if c in node]
    return node

  map_layers(collect, stats)
  return flat
