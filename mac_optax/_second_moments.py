"""The exact input factor ``(Σ + λI)⁻¹`` of chosen layers (the first layer).

The reference code gives its first layer the full damped inverse of the
layer's input second moment ``Σ`` instead of MAC's rank-one factor. Here that
is a transformation of its own, which :func:`mac` chains beside
:func:`scale_by_mac` when given ``second_moments``.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mac_optax import _geometry
from mac_optax import _hyperparameters
from mac_optax import _preconditioner
from mac_optax import _sharding

Path = _geometry.Path
path_str = _geometry.path_str
SECOND_MOMENT = 'second_moment'


class ScaleBySecondMomentsState(NamedTuple):
  """State of :func:`scale_by_second_moments`.

  Attributes:
    count: steps taken (int32).
    second_moment: per layer (nested by module path), ``Σ`` (fp32,
      ``d x d``).
    damped_inverse: per layer, the factor applied to its gradient as of the
      last refresh (fp32, ``d x d``).
  """

  count: jax.Array
  second_moment: Any
  damped_inverse: Any


def moments_by_path(second_moments: Any) -> dict[Path, Any]:
  """``{module path: Σ}`` from ``{path...: {'second_moment': Σ}}``."""
  flat = {}

  def walk(path, node):
    if not isinstance(node, Mapping):
      raise ValueError(
          'second_moments: expected nested dicts keyed by module path with'
          f' {SECOND_MOMENT!r} leaves, as input_second_moments returns them;'
          f' found {type(node).__name__} at {path_str(path)}.')
    for key, child in node.items():
      if key == SECOND_MOMENT:
        flat[path] = child
      else:
        walk(path + (key,), child)

  walk((), second_moments)
  return flat


def check_second_moment(moment: Any, where: str) -> None:
  """Raises unless a concrete ``Σ`` is finite, symmetric and PSD.

  A second moment ``E[x xᵀ]`` has these properties up to float32 rounding;
  one without them (a NaN sample, inputs whose squares overflow, a matrix
  that is not a second moment) would make every update of its layer NaN.
  Shapes (``jax.ShapeDtypeStruct``) and traced values are not checked.

  Args:
    moment: ``Σ``, ``d x d``.
    where: names the layer, for the error.
  """
  if isinstance(moment, (jax.ShapeDtypeStruct, jax.core.Tracer)):
    return
  matrix = np.asarray(moment, np.float64)
  bad = int(np.size(matrix) - np.count_nonzero(np.isfinite(matrix)))
  if bad:
    raise ValueError(
        f'{where} has {bad} NaN or Inf entries: a batch with non-finite'
        ' inputs, or inputs so large (|x| beyond ~1.8e19) that their squares'
        ' overflow float32. Compute it from clean data.'
    )
  dim = matrix.shape[-1]
  eigenvalues = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))
  largest = float(np.max(np.abs(eigenvalues), initial=0.0))
  # float32 sums of outer products are PSD up to rounding of this order,
  # which is also where a float32 Cholesky of Σ + λI stops being reliable.
  tolerance = 8 * dim * float(np.finfo(np.float32).eps) * largest
  asymmetry = float(np.max(np.abs(matrix - matrix.T), initial=0.0))
  if asymmetry > tolerance:
    raise ValueError(
        f'{where} is not symmetric (entries differ from their transposes by'
        f' up to {asymmetry:.3g}); a second moment E[x xᵀ] is.'
    )
  if eigenvalues[0] < -tolerance:
    raise ValueError(
        f'{where} is not positive semi-definite: its smallest eigenvalue is'
        f' {eigenvalues[0]:.3g} (largest {largest:.3g}); a second moment'
        ' E[x xᵀ] has none below 0.'
    )


def _checked_moments(layers: _geometry.Layers,
                     second_moments: Any) -> dict[Path, Any]:
  """``{module path: Σ}``, each checked against its layer."""
  flat = moments_by_path(second_moments)
  for path, moment in flat.items():
    spec = layers.require(path, 'second_moments has a matrix')
    where = f'second_moments for layer {path_str(path)} ({spec.module})'
    _geometry.check_exact_factor(spec, where)
    expected = (spec.dim, spec.dim)
    if tuple(np.shape(moment)) != expected:
      raise ValueError(
          f'{where} has shape {tuple(np.shape(moment))}, expected {expected}'
          ' (the input size, plus one for the bias).'
      )
    check_second_moment(moment, where)
  return flat


def _damped_inverse(moment, damping, scale) -> jax.Array:
  """``(Σ + λI)⁻¹`` (times ``λ`` for ``'damping'``), symmetric, fp32."""
  damping = jnp.asarray(damping, jnp.float32)
  dim = moment.shape[-1]
  matrix = moment + damping * jnp.eye(dim, dtype=jnp.float32)
  factor = jax.scipy.linalg.cho_factor(matrix, lower=True)
  inverse = jax.scipy.linalg.cho_solve(factor, jnp.eye(dim, dtype=jnp.float32))
  inverse = 0.5 * (inverse + inverse.T)
  if scale == 'damping':
    inverse = damping * inverse
  return inverse


def _apply_inverse(kernel, bias, inverse, spec: _geometry.LayerSpec):
  """``F Ĝ`` with ``Ĝ`` the ``(d, out)`` kernel gradient plus a bias row."""
  if _sharding.is_explicit(kernel, bias):
    # As in precondition: reshapes and the concatenation in Auto mode.
    return _sharding.with_auto_axes(
        lambda *args: _apply_inverse(*args, spec), (kernel, bias),
        kernel, bias, inverse)
  d_in = spec.dim - int(spec.has_bias)
  canonical = spec.to_canonical(kernel)
  grad = canonical.astype(jnp.float32).reshape(d_in, -1)
  if spec.has_bias:
    grad = jnp.concatenate(
        [grad, bias.astype(jnp.float32).reshape(1, -1)], axis=0
    )
  grad = jnp.matmul(inverse, grad, precision=jax.lax.Precision.HIGHEST)
  new_kernel = spec.from_canonical(
      grad[:d_in].reshape(canonical.shape).astype(kernel.dtype))
  if not spec.has_bias:
    return new_kernel, None
  return new_kernel, grad[d_in].reshape(bias.shape).astype(bias.dtype)


def scale_by_second_moments(
    layers: _geometry.Layers,
    second_moments: Any,
    damping: jax.typing.ArrayLike = 1.0,
    t_inv: jax.typing.ArrayLike = 50,
    *,
    scale: _preconditioner.Scale = 'unit',
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions chosen layers with their input second moment's inverse.

  For each layer in ``second_moments`` (kernel and bias jointly, the bias as
  the last input coordinate), with :math:`\Sigma` its input second moment
  from :func:`input_second_moments`,

  .. math::
    \hat G \leftarrow (\Sigma + \lambda I)^{-1} \hat G,

  the reference code's first-layer factor (``scale='damping'`` multiplies
  it by :math:`\lambda`, the scale of MAC's rank-one layers). The inverse is
  recomputed at steps :math:`t` with :math:`t \bmod T_{inv} = 0` (so an
  injected damping acts as MAC's does) and kept between them. Other
  parameters pass through. :func:`mac` chains it before
  :func:`scale_by_mac` when given ``second_moments``; to build that by hand,
  give ``scale_by_mac`` the other layers,
  ``layers.without(second_moments_paths)``.

  Args:
    layers: the layers, from :func:`find_layers`.
    second_moments: ``{module path...: {'second_moment': Σ}}`` from
      :func:`input_second_moments`. Each concrete :math:`\Sigma` must be
      finite, symmetric and positive semi-definite (up to float32 rounding),
      else a ``ValueError`` names the layer. For a restore target,
      ``jax.ShapeDtypeStruct`` leaves are accepted (the state then holds
      zeros until the checkpoint is restored into it).
    damping: :math:`\lambda > 0`.
    t_inv: the inverse is refreshed every ``t_inv`` steps.
    scale: ``'unit'`` (the reference's :math:`(\Sigma + \lambda I)^{-1}`) or
      ``'damping'`` (:math:`\lambda (\Sigma + \lambda I)^{-1}`).

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`; it
    ignores ``mac_stats``.
  """
  scale = _preconditioner.check_scale('scale', scale)
  _hyperparameters.check(damping, 0.0, 1, t_inv)
  moments = _checked_moments(layers, second_moments)

  def init_fn(params):
    if not isinstance(params, Mapping):
      return ScaleBySecondMomentsState(
          jnp.zeros([], jnp.int32), _geometry.PerLayerFields(),
          _geometry.PerLayerFields())
    active = _geometry.active_layers(layers, params)
    kept = {}
    for path, moment in moments.items():
      if path not in active:
        continue
      if isinstance(moment, jax.ShapeDtypeStruct):
        moment = jnp.zeros(moment.shape, jnp.float32)
      kept[path] = jnp.asarray(moment, jnp.float32)
    return ScaleBySecondMomentsState(
        count=jnp.zeros([], jnp.int32),
        second_moment=_geometry.nest_per_layer(kept),
        damped_inverse=_geometry.nest_per_layer(
            {path: jnp.zeros_like(m) for path, m in kept.items()}),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    sigmas = dict(_geometry.leaf_paths(state.second_moment))
    inverses = dict(_geometry.leaf_paths(state.damped_inverse))
    for path, sigma in sigmas.items():
      spec = layers.require(path, 'the optimizer state has a second moment')
      if tuple(np.shape(sigma)) != (spec.dim, spec.dim):
        raise ValueError(
            f'the optimizer state has a {tuple(np.shape(sigma))} second moment'
            f' for {path_str(path)}, but `layers` gives it an input of size'
            f' {spec.dim}: the state was built (or restored) for another'
            ' model, or `layers` for another one.')
    refresh_now = state.count % _hyperparameters.guarded_period(t_inv) == 0
    safe_damping = _hyperparameters.guarded_damping(damping)
    new_inverses = {}
    for path, sigma in sigmas.items():
      # Recomputed at refreshes only: the cubic cost is paid every t_inv
      # steps.
      new_inverses[path] = jax.lax.cond(
          refresh_now,
          lambda sigma: _damped_inverse(sigma, safe_damping, scale),
          lambda _, old=inverses[path]: old,
          sigma,
      )
    gradients = _geometry.layer_gradients(updates, sigmas, layers)
    updates = _geometry.replace_layer_gradients(updates, {
        path: _apply_inverse(*gradients[path], new_inverses[path],
                             layers[path])
        for path in sigmas})
    return updates, ScaleBySecondMomentsState(
        count=optax.safe_increment(state.count),
        second_moment=state.second_moment,
        damped_inverse=_geometry.nest_per_layer(new_inverses))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
