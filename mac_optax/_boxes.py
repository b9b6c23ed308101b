"""Boxed parameters: one array wrapped with metadata, read and written as one.

Linen's ``nn.with_partitioning`` / ``nn.with_logical_partitioning`` make
parameters ``nn.Partitioned`` / ``nn.LogicallyPartitioned`` (flax axis
metadata), and NNX keeps parameters in ``nnx.Variable``s. Both are pytree
nodes whose one child is the array, so a plain tree map sees ``.../value``
paths. MAC treats each box as one leaf at the parameter's path, works on the
array inside, and puts results back in a box like the original, so sharding
names survive.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
from flax.core import meta as flax_meta


def is_leaf_box(node: Any) -> bool:
  """Whether ``node`` is a box around one parameter (a leaf, not a node)."""
  return isinstance(node, (nnx.Variable, flax_meta.AxisMetadata))


def unbox(leaf: Any) -> Any:
  """The array inside a box, or ``leaf`` itself."""
  if isinstance(leaf, nnx.Variable):
    return leaf.get_value()
  if isinstance(leaf, flax_meta.AxisMetadata):
    # Not ``leaf.unbox()``: under a mesh, linen's partitioned boxes would add
    # a sharding constraint to what is only read here.
    value = getattr(leaf, 'value', None)
    return leaf.unbox() if value is None else value
  return leaf


def rebox(leaf: Any, value: Any) -> Any:
  """``value`` in a box like ``leaf`` (metadata kept), or ``value`` itself."""
  if isinstance(leaf, nnx.Variable):
    return leaf.replace(value)
  if isinstance(leaf, flax_meta.AxisMetadata):
    return leaf.replace_boxed(value)
  return value
