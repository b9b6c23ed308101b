"""Shardings of a MAC optimizer state, for explicitly sharded training."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import optax

from mac_optax import _boxes


def explicit_spec(value: Any) -> PartitionSpec | None:
  """The ``PartitionSpec`` of ``value``'s type if it names mesh axes, else None.

  Under a mesh with ``Explicit`` axes (``jax.make_mesh``'s default), an
  array's sharding is part of its type, and operations such as
  ``concatenate`` or ``where`` refuse operands sharded differently. Values
  under ``Auto`` axes, outside any mesh or sharded only over the ``Manual``
  axes of a ``shard_map`` have no such sharding (None).
  """
  sharding = getattr(jax.typeof(value), 'sharding', None)
  spec = getattr(sharding, 'spec', None)
  if spec is None or all(entry is None for entry in spec):
    return None
  return spec


def is_explicit(*values: Any) -> bool:
  """Whether any of ``values`` (None allowed) is explicitly sharded."""
  return any(explicit_spec(v) is not None for v in values if v is not None)


def replicated(value: jax.Array) -> jax.Array:
  """``value`` replicated if its type is explicitly sharded, else unchanged.

  MAC's statistics are small vectors that every device needs whole, so they
  are made replicated where they are computed (an all-gather of one vector
  per layer) whichever way the activations they come from are sharded.
  """
  if explicit_spec(value) is None:
    return value
  # The value's own (abstract) mesh: there may be no mesh in context.
  mesh = jax.typeof(value).sharding.mesh
  return jax.sharding.reshard(value, NamedSharding(mesh, PartitionSpec()))


def with_auto_axes(fn: Any, like: Any, *args: Any) -> Any:
  """``fn(*args)``, with explicitly sharded arguments, computed in Auto mode.

  Under Explicit axes, reshapes that merge or split sharded dimensions (a
  ``(in, heads, head_dim)`` kernel gradient flattened to ``(in, out)``) need
  their output sharding spelled out. MAC's arithmetic on a gradient is the
  same whichever way it is sharded, so it runs with the mesh axes switched to
  Auto (``jax.sharding.auto_axes``), where the compiler places those reshapes,
  and each output gets the sharding of the matching leaf of ``like``.

  Args:
    fn: the computation.
    like: a tree of arrays shaped like ``fn``'s outputs (None for None).
    *args: ``fn``'s arguments.

  Returns:
    ``fn(*args)``, sharded like ``like``.
  """
  mesh = jax.sharding.get_abstract_mesh()
  for leaf in jax.tree.leaves((like, args)):
    if mesh.empty and explicit_spec(leaf) is not None:
      # No mesh in context (a jit of sharded arrays without jax.set_mesh):
      # the arrays' own mesh.
      mesh = jax.typeof(leaf).sharding.mesh
  out_sharding = jax.tree.map(lambda leaf: jax.typeof(leaf).sharding.spec,
                              like)
  with jax.sharding.use_abstract_mesh(mesh):
    # Only the Explicit axes: inside shard_map, its Manual axes stay manual.
    return jax.sharding.auto_axes(
        fn, axes=mesh.explicit_axes, out_sharding=out_sharding)(*args)


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
      ``NamedSharding`` leaves. With boxed parameters
      (``nn.with_logical_partitioning``), one per box, boxed or not (e.g.
      ``nn.get_partition_spec(params)``).

  Returns:
    A tree like ``tx.init(params)`` of the same kind of leaves; boxes in the
    state (the momentum of boxed parameters) hold their parameter's sharding,
    and optimizers under ``optax.masked`` / ``optax.partition`` keep their
    ``MaskedNode`` leaves.

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
    >>> specs[0].mean_input == P()  # MAC statistic: replicated
    True
  """
  abstract = jax.eval_shape(tx.init, params)
  # Boxed parameters (nn.LogicallyPartitioned, ...): a sharding per array,
  # whether param_sharding comes boxed or not (nn.get_partition_spec).
  param_sharding = jax.tree.map(_boxes.unbox, param_sharding,
                                is_leaf=_boxes.is_leaf_box)
  replicated_sharding = _replicated_like(param_sharding)

  def like_params(value, sharding):
    # optax.masked / optax.partition keep MaskedNodes where their inner
    # optimizer has no state; a box in the state gets the sharding boxed.
    if isinstance(value, optax.MaskedNode):
      return value
    return _boxes.rebox(value, sharding)

  return optax.tree.map_params(
      tx,
      like_params,
      abstract,
      param_sharding,
      # A whole subtree where the placeholder state has a leaf (MAC's
      # per-layer statistics, whose layers depend on a mask).
      transform_non_params=lambda value: jax.tree.map(
          lambda _: replicated_sharding, value),
      is_leaf=_is_param_leaf,
  )


def _is_param_leaf(node: Any) -> bool:
  """Boxes and optax's MaskedNodes stand where a parameter is."""
  return isinstance(node, optax.MaskedNode) or _boxes.is_leaf_box(node)
