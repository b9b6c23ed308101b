"""Layers of equal shapes computed by one compiled body, not one per layer.

A Python loop over layers emits a few dozen small XLA ops per layer, so a
model's compile time would grow with its depth several times faster than the
model's own. Layers whose inputs have equal shapes are stacked and run through
``jax.lax.map`` instead: the per-layer computation is compiled once per group,
and each layer costs one stack entry and one slice. (Stacking alone, with the
arithmetic vectorised over the group, does not help: XLA fuses the group's
elementwise work into every layer's slice of the result.) The slices still
cost compile time: they differ in their offsets, and XLA:CPU compiles each
distinct fusion on its own, so the step of a deep unscanned model compiles in
about 2.8 times SGD's (the README's compile table says where it goes).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Iterable, Mapping, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

Key = TypeVar('Key')


def group(items: Iterable[Key], key: Callable[[Key], Hashable]
          ) -> list[list[Key]]:
  """``items`` split by ``key``, in order of first appearance."""
  groups: dict[Hashable, list[Key]] = {}
  for item in items:
    groups.setdefault(key(item), []).append(item)
  return list(groups.values())


def _signature(tree: Any) -> Hashable:
  leaves, structure = jax.tree.flatten(tree)
  return structure, tuple((np.shape(x), jnp.result_type(x)) for x in leaves)


def map_groups(fn: Callable[[Any], Any], inputs: Mapping[Key, Any]
               ) -> dict[Key, Any]:
  """``{k: fn(inputs[k])}``, with ``fn`` traced once per group of shapes.

  Args:
    fn: a function of one pytree of arrays, free of Python control flow on
      their values (it runs under ``jax.lax.map``).
    inputs: key -> ``fn``'s argument.

  Returns:
    key -> ``fn``'s result, as if called on each input alone.
  """
  results = {}
  for keys in group(inputs, lambda k: _signature(inputs[k])):
    if len(keys) == 1:
      results[keys[0]] = fn(inputs[keys[0]])
      continue
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *(inputs[k] for k in keys))
    outputs = jax.lax.map(fn, stacked)
    for i, k in enumerate(keys):
      results[k] = jax.tree.map(lambda x, i=i: x[i], outputs)
  return results
