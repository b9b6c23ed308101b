"""Shardings of a MAC optimizer state, for explicitly sharded training."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import optax


def _replicated_like(param_sharding: Any) -> Any:
  """``P()``, or a replicated ``NamedSharding`` on the parameters' mesh."""
  for leaf in jax.tree.leaves(param_sharding):
    if isinstance(leaf, NamedSharding):
      return NamedSharding(leaf.mesh, PartitionSpec())
    if isinstance(leaf, PartitionSpec):
      return PartitionSpec()
    raise TypeError(
        'param_sharding leaves must be PartitionSpecs or NamedShardings, got'
        f' {type(leaf).__name__}.'
    )
  return PartitionSpec()


def state_sharding(
    tx: optax.GradientTransformation, params: Any, param_sharding: Any
) -> Any:
  """Partition specs (or shardings) for ``tx.init(params)``.

  Every part of the optimizer state shaped like the parameters (momentum,
  gradient accumulators) gets the parameters' ``param_sharding``, found with
  ``optax.tree.map_params``; everything else is replicated. For MAC that is
  the per-layer statistics (a vector of the layer's input size per layer,
  small next to its kernel), the counters and any first-layer second moment:
  every replica needs all of them to precondition its shard of the gradient.
  Use the result as ``in_shardings``/``out_shardings`` of the jitted step (FSDP
  or tensor-parallel parameters), or to build an orbax restore target, as
  t5x/maxtext-style trainers do.

  Args:
    tx: the optimizer, e.g. :func:`mac`.
    params: the parameters or their shapes (``jax.ShapeDtypeStruct``).
    param_sharding: a tree like ``params`` of ``PartitionSpec`` or
      ``NamedSharding`` leaves.

  Returns:
    A tree like ``tx.init(params)`` of the same kind of leaves.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, mac_optax
    >>> from jax.sharding import PartitionSpec as P
    >>> model = nn.Dense(8)
    >>> x = jnp.ones((4, 3))
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> layers = mac_optax.find_layers(model.apply, {'params': params}, x)
    >>> tx = mac_optax.mac(0.1, layers=layers)
    >>> specs = mac_optax.state_sharding(
    ...     tx, params, {'kernel': P(None, 'model'), 'bias': P('model')})
    >>> specs[1].trace['kernel'] == P(None, 'model')  # momentum: like params
    True
    >>> specs[0].mean_input['mean_input'] == P()  # MAC statistic: replicated
    True
  """
  abstract = jax.eval_shape(tx.init, params)
  replicated = _replicated_like(param_sharding)
  return optax.tree.map_params(
      tx,
      lambda _, sharding: sharding,
      abstract,
      param_sharding,
      transform_non_params=lambda _: replicated,
  )
