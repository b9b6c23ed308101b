"""The MAC optimizer: preconditioner, momentum, weight decay, learning rate."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from mac_optax import _geometry
from mac_optax import _preconditioner
from mac_optax import _second_moments
from mac_optax import _transform


def mac(
    learning_rate: optax.ScalarOrSchedule,
    *,
    layers: _geometry.Layers,
    momentum: jax.typing.ArrayLike = 0.9,
    weight_decay: jax.typing.ArrayLike = 5e-4,
    damping: jax.typing.ArrayLike = 1.0,
    stat_decay: jax.typing.ArrayLike = 0.95,
    t_cov: jax.typing.ArrayLike = 5,
    t_inv: jax.typing.ArrayLike = 50,
    nesterov: bool = False,
    weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
    scale: _preconditioner.Scale = 'damping',
    axis_name: Any = None,
    second_moments: Any = None,
    second_moment_scale: _preconditioner.Scale = 'unit',
) -> optax.GradientTransformationExtraArgs:
  r"""MAC, as in the authors' ImageNet/DeiT code (decoupled weight decay).

  With :math:`P` the preconditioner of :func:`scale_by_mac` (identity for
  parameters outside ``layers``), each step computes

  .. math::
    b &\leftarrow \mu\, b + P(g) \\
    \theta &\leftarrow (1 - \eta\, w)\, \theta - \eta\, b,

  built as ``optax.chain(scale_by_mac, optax.trace, optax.add_decayed_weights,
  optax.scale_by_learning_rate)``, with :func:`scale_by_second_moments` first
  when ``second_moments`` are given. For the CIFAR code's coupled L2 (decay
  added to the preconditioned gradient before momentum) chain
  ``optax.add_decayed_weights`` before ``optax.trace`` yourself.

  ``nesterov=True`` uses optax's Nesterov momentum, whose first step is
  :math:`(1+\mu) P(g)`; the authors' nanoGPT code takes :math:`P(g)` there and
  agrees from the second step on.

  Args:
    learning_rate: :math:`\eta`, a scalar or an optax schedule.
    layers: the preconditioned layers, from :func:`find_layers` (not empty,
      unless found with ``allow_empty=True``).
    momentum: :math:`\mu`, heavy-ball momentum.
    weight_decay: :math:`w`, decoupled weight decay.
    damping: :math:`\lambda > 0`, a scalar (an injected value below 1e-20
      acts as 1e-20, see :func:`scale_by_mac`).
    stat_decay: EMA decay :math:`\beta \in [0, 1)` of the mean activations
      (an injected value is clamped into it).
    t_cov: statistics are folded into the EMA every ``t_cov`` steps.
    t_inv: the preconditioner is refreshed every ``t_inv`` steps.
    nesterov: Nesterov momentum.
    weight_decay_mask: which parameters decay, as for
      ``optax.add_decayed_weights``: a bool tree or a callable of params.
    scale: ``'damping'`` (the reference) or ``'unit'``, see
      :func:`scale_by_mac`.
    axis_name: the ``shard_map``/``pmap`` data axis over which the statistics
      are merged; None under ``jax.jit`` (see :func:`scale_by_mac`).
    second_moments: input second moments of the layers that get the exact
      ``(Σ + λI)⁻¹`` factor, from :func:`input_second_moments` (finite,
      symmetric and positive semi-definite, else a ``ValueError``).
    second_moment_scale: ``'unit'`` (the reference) or ``'damping'``, see
      :func:`scale_by_second_moments`.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`; its
    ``update`` takes ``mac_stats=`` from :func:`capture`.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, mac_optax
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(1)])
    >>> x = jax.random.normal(jax.random.key(0), (32, 4))
    >>> y = x.sum(-1, keepdims=True)
    >>> variables = model.init(jax.random.key(1), x)
    >>> layers = mac_optax.find_layers(model.apply, variables, x)
    >>> tx = mac_optax.mac(learning_rate=0.05, layers=layers)
    >>> apply_with_stats = mac_optax.capture(model.apply)
    >>> def loss_fn(params):
    ...   out, stats = apply_with_stats({'params': params}, x)
    ...   return jnp.mean((out - y) ** 2), stats
    >>> @jax.jit
    ... def step(params, opt_state):
    ...   (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    ...   updates, opt_state = tx.update(grads, opt_state, params, mac_stats=stats)
    ...   return optax.apply_updates(params, updates), opt_state, loss
    >>> params = variables['params']
    >>> opt_state = tx.init(params)
    >>> for _ in range(100):
    ...   params, opt_state, loss = step(params, opt_state)
    >>> bool(loss < 0.05)
    True

  References:
    Seung, Lee and Ko, `MAC: An Efficient Gradient Preconditioning using Mean
    Activation Approximated Curvature <https://arxiv.org/abs/2506.08464>`_,
    ICDM 2025.
  """
  return optax.chain(
      *preconditioners(layers, damping, stat_decay, t_cov, t_inv, scale=scale,
                       axis_name=axis_name, second_moments=second_moments,
                       second_moment_scale=second_moment_scale),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def preconditioners(
    layers: _geometry.Layers, damping, stat_decay, t_cov, t_inv, *,
    scale: _preconditioner.Scale = 'damping', axis_name: Any = None,
    second_moments: Any = None,
    second_moment_scale: _preconditioner.Scale = 'unit',
) -> list[optax.GradientTransformationExtraArgs]:
  """``[scale_by_mac]``, after ``scale_by_second_moments`` if given them."""
  scale = _preconditioner.check_scale('scale', scale)
  second_moment_scale = _preconditioner.check_scale('second_moment_scale',
                                                    second_moment_scale)
  chain = []
  if second_moments is not None:
    chain.append(_second_moments.scale_by_second_moments(
        layers, second_moments, damping, t_inv, scale=second_moment_scale))
    layers = layers.without(_second_moments.moments_by_path(second_moments))
  chain.append(_transform.scale_by_mac(
      layers, damping, stat_decay, t_cov, t_inv, scale=scale,
      axis_name=axis_name))
  return chain
