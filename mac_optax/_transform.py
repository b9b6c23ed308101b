"""MAC's preconditioner as an optax gradient transformation."""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mac_optax import _boxes
from mac_optax import _geometry
from mac_optax import _sharding
from mac_optax import _stats

Path = _geometry.Path
path_str = _geometry.path_str
_SCALES = ('reference', 'exact')
_SECOND_MOMENT_SCALES = ('unscaled', 'damping')
SECOND_MOMENT = 'second_moment'
_INVERSE = 'damped_inverse'
_SKIPPED = 'skipped_captures'
# A mean activation beyond this (in magnitude) is a numerical fault, not a
# statistic: it is skipped like a NaN one. Far beyond what a working network
# produces, it keeps the EMA and its bias correction (a division by at least
# 1 - stat_decay >= 2**-24 in float32) finite. The preconditioner itself is
# exact for any finite statistic.
MAX_STATISTIC = 1e24
# An injected damping below this (or NaN) acts as this.
MIN_DAMPING = 1e-20
# The largest float32 below 1: an injected stat_decay is clamped to it.
_MAX_DECAY = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


class ScaleByMacState(NamedTuple):
  """State of :func:`scale_by_mac`.

  Attributes:
    count: steps taken, ``t`` (int32).
    stat_count: capture steps so far, ``k`` (int32); bias correction divides
      by ``1 - stat_decay**k`` (less a layer's skipped captures).
    mean_input_ema: per-layer EMA of the mean input, shaped like ``mac_stats``
      (fp32).
    mean_input: per-layer bias-corrected EMA as of the last refresh, the
      ``â`` the preconditioner uses (fp32).
    skipped_captures: per layer, how many capture steps were skipped because
      that layer's statistic was not finite (int32).
    exact_factors: for the layers given ``second_moments``, the input second
      moment ``Σ`` and the damped inverse applied to their gradient (fp32,
      ``d x d``); empty otherwise.
  """

  count: jax.Array
  stat_count: jax.Array
  mean_input_ema: Any
  mean_input: Any
  skipped_captures: Any = {}
  exact_factors: Any = {}


class _PerLayerFields:
  """Stands for a per-layer field of the state when the params are unknown."""

  def __repr__(self) -> str:
    return '<per-layer MAC statistics>'


def nest(flat: Mapping[Path, Any], name: str = _stats.MEAN) -> dict:
  """{module path: value} -> nested dict with ``name`` leaves."""
  return _stats.nest({path: {name: value} for path, value in flat.items()})


def _unnest(
    tree: Any, name: str, what: str, siblings: tuple[str, ...] = ()
) -> dict[Path, Any]:
  """Nested dict with ``name`` leaves -> {module path: value}.

  Keys in ``siblings`` are other leaves that may sit next to ``name``.
  """
  flat = {}

  def walk(path, node):
    if not isinstance(node, Mapping):
      raise ValueError(
          f'{what}: expected nested dicts keyed by module path with'
          f' {name!r} leaves; found {type(node).__name__} at'
          f' {path_str(path)}.'
      )
    for key, child in node.items():
      if key == name:
        flat[path] = child
      elif key not in siblings:
        walk(path + (key,), child)

  walk((), tree)
  return flat


def _is_concrete_number(value) -> bool:
  return isinstance(value, numbers.Number) or (
      isinstance(value, (np.ndarray, np.generic, jax.Array))
      and not isinstance(value, jax.core.Tracer)
      and np.ndim(value) == 0
  )


def _validate_hyperparameters(damping, stat_decay, t_cov, t_inv) -> None:
  """Checks concrete hyperparameters (injected, traced ones cannot be)."""
  if _is_concrete_number(damping) and not float(damping) > 0:
    raise ValueError(f'damping must be > 0, got {damping}.')
  if _is_concrete_number(stat_decay) and not 0 <= float(stat_decay) < 1:
    raise ValueError(f'stat_decay must be in [0, 1), got {stat_decay}.')
  for name, period in (('t_cov', t_cov), ('t_inv', t_inv)):
    if _is_concrete_number(period) and (
        int(period) != period or int(period) < 1
    ):
      raise ValueError(f'{name} must be a positive integer, got {period}.')


def _check_scalar(name: str, value) -> None:
  """Hyperparameters are single numbers (one damping for every layer)."""
  shape = jnp.shape(value)
  if shape:
    raise ValueError(
        f'{name} must be a scalar, got an array of shape {shape}: MAC uses'
        ' one value for every layer.'
    )


def _guarded_decay(stat_decay) -> jax.Array:
  """``stat_decay`` as float32, clamped into ``[0, 1)`` when traced.

  An injected (traced) value cannot be checked; 1.0 would stop the EMA and
  make the bias correction divide by zero. NaN counts as 0 (no memory).
  """
  decay = jnp.asarray(stat_decay, jnp.float32)
  if _is_concrete_number(stat_decay):
    return decay  # checked at construction
  return jnp.where(decay >= 0.0, jnp.minimum(decay, _MAX_DECAY), 0.0)


def _guarded_damping(damping) -> jax.Array:
  """``damping`` as float32, at least ``MIN_DAMPING`` when traced.

  With 0 the ``'exact'`` scale divides by zero and a zero statistic gives
  0 / 0; NaN counts as the floor too.
  """
  value = jnp.asarray(damping, jnp.float32)
  if _is_concrete_number(damping):
    return value  # checked at construction
  return jnp.where(value >= MIN_DAMPING, value, MIN_DAMPING)


def _guarded_period(period):
  """An injected ``t_cov``/``t_inv`` below 1 acts as 1 (no modulo by 0)."""
  if _is_concrete_number(period):
    return period  # checked at construction
  return jnp.maximum(period, 1)


def _check_full_precision(name: str, value) -> None:
  """Rejects float16/bfloat16 hyperparameters, e.g. from inject_hyperparams."""
  dtype = getattr(value, 'dtype', None)
  if (
      dtype is not None
      and jnp.issubdtype(dtype, jnp.floating)
      and jnp.finfo(dtype).bits < 32
  ):
    raise ValueError(
        f'{name} is a {jnp.dtype(dtype).name} value: MAC keeps its statistics'
        ' arithmetic in float32, and a rounded stat_decay or damping changes'
        ' the algorithm (bfloat16 rounds a stat_decay of 0.999 to 1.0).'
        ' optax.inject_hyperparams casts float hyperparameters to the'
        ' parameters\' dtype; pass hyperparam_dtype=jnp.float32 to it.'
    )


def _reject_optax_multisteps() -> None:
  """Raises when an ``optax.MultiSteps`` is calling this update.

  MultiSteps runs the inner update on every micro-batch but keeps the inner
  state only on the last one, so MAC would see only the last micro-batch's
  statistics. It calls the inner update from its own methods, so one of the
  calling frames has the MultiSteps instance as ``self``.
  """
  # The frames are the only signal: MultiSteps passes the extra arguments
  # through unchanged and hands the inner update nothing that names its
  # caller. Under jax.jit this Python runs once per trace, not per step.
  frame = inspect.currentframe()
  try:
    while frame is not None:
      if isinstance(frame.f_locals.get('self'), optax.MultiSteps):
        raise ValueError(
            'scale_by_mac is being run by optax.MultiSteps, which keeps only'
            ' the last micro-batch\'s statistics and would silently'
            ' precondition with them. Use mac_optax.multi_steps(tx, k,'
            ' example_stats=...) instead: it merges every micro-batch\'s'
            ' statistics, weighted by rows, and steps MAC once per k'
            ' micro-batches.'
        )
      frame = frame.f_back
  finally:
    del frame


def _check_second_moments(
    layers: _geometry.Layers, second_moments: Any
) -> dict[Path, Any]:
  """{module path: Σ or its shape} from the ``second_moments`` argument."""
  flat = _unnest(second_moments, SECOND_MOMENT, 'second_moments', (_INVERSE,))
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


def _damped_inverse(moment, damping, convention: str) -> jax.Array:
  """``(Σ + λI)⁻¹`` (times ``λ`` for ``'damping'``), symmetric, fp32."""
  damping = jnp.asarray(damping, jnp.float32)
  dim = moment.shape[-1]
  matrix = moment + damping * jnp.eye(dim, dtype=jnp.float32)
  factor = jax.scipy.linalg.cho_factor(matrix, lower=True)
  inverse = jax.scipy.linalg.cho_solve(factor, jnp.eye(dim, dtype=jnp.float32))
  inverse = 0.5 * (inverse + inverse.T)
  if convention == 'damping':
    inverse = damping * inverse
  return inverse


def _precondition_exact(kernel, bias, inverse, spec: _geometry.LayerSpec):
  """``F Ĝ`` with ``Ĝ`` the ``(d, out)`` kernel gradient plus a bias row."""
  if _sharding.is_explicit(kernel, bias):
    # As in precondition: reshapes and the concatenation in Auto mode.
    return _sharding.with_auto_axes(
        lambda *args: _precondition_exact(*args, spec), (kernel, bias),
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


def _usable(stat: jax.Array, counts: list[jax.Array]) -> jax.Array:
  """Whether a layer's statistic may enter its EMA (a bool scalar).

  Not if any entry is NaN, Inf or beyond ``MAX_STATISTIC`` in magnitude (a
  numerical fault), nor if it saw no rows (an empty batch, or attention with
  every query masked, whose value statistic is all zeros).
  """
  usable = jnp.all(jnp.abs(stat) <= MAX_STATISTIC)  # False for NaN too
  for count in counts:
    usable &= jnp.all(count > 0)
  return usable


def _check_state_against_layers(layers, emas, mean_inputs, skipped,
                                moments) -> None:
  """The state must hold ``layers``' statistics (not another model's)."""
  another = (': the state was built (or restored) for another model, or'
             ' `layers` for another one.')
  for what, flat in (('mean_input_ema', emas), ('mean_input', mean_inputs)):
    for path, value in flat.items():
      if path not in layers:
        raise ValueError(
            f'the optimizer state has a {what} for {path_str(path)}, which is'
            f' not a layer of `layers` (known: {layers.known()}){another}'
        )
      spec = layers[path]
      if tuple(np.shape(value)) != spec.stat_shape:
        raise ValueError(
            f'the optimizer state\'s {what} for layer {path_str(path)}'
            f' ({spec.module}) has shape {tuple(np.shape(value))}, but'
            f' `layers` gives the layer a statistic of shape'
            f' {spec.stat_shape}{another}'
        )
  for what, flat in (('mean_input', mean_inputs), ('skipped_captures',
                                                   skipped)):
    if set(flat) != set(emas):
      odd = sorted(map(path_str, set(flat) ^ set(emas)))
      raise ValueError(
          f'the optimizer state\'s {what} and mean_input_ema differ in the'
          f' layers {", ".join(odd)}; the state is not one scale_by_mac built.'
      )
  for path, moment in moments.items():
    spec = layers.get(path)
    expected = None if spec is None else (spec.dim, spec.dim)
    if tuple(np.shape(moment)) != expected:
      raise ValueError(
          f'the optimizer state has a {tuple(np.shape(moment))} second moment'
          f' for {path_str(path)}, but `layers`'
          + (' has no such layer' if spec is None else
             f' gives it an input of size {spec.dim}') + another
      )


def _check_unlisted_kernels(layers: _geometry.Layers, params: Any) -> None:
  """Every kernel in ``params`` belongs to a module ``find_layers`` saw.

  A kernel under a module path that the traced forward pass never reached
  means ``layers`` was found on another model (a shallower one with the same
  path names would leave the extra layers unpreconditioned without a word).
  ``Layers`` built without module records (by hand) are not checked.
  """
  if not layers.modules:
    return
  for path, leaf in _geometry.leaf_paths(params):
    if not path or path[-1] != 'kernel' or isinstance(leaf, optax.MaskedNode):
      continue
    module_path = path[:-1]
    if module_path in layers or module_path in layers.modules:
      continue
    raise ValueError(
        f'params has a kernel at {path_str(path)}, but the forward pass that'
        f' find_layers traced never reached a module {path_str(module_path)}:'
        ' `layers` was found on another model (or with arguments that skip'
        ' this module). Call find_layers on the model you train, with the'
        ' arguments of a training step; a module that training deliberately'
        ' never calls can be left out of MAC with optax.masked or'
        ' optax.partition.'
    )


def _active_layers(layers: _geometry.Layers, params: Any) -> dict[Path, Any]:
  """Layers whose kernel is present (not masked out) in ``params``."""
  active = {}
  for path, spec in layers.items():
    node = _geometry.lookup(params, path)
    where = f'layer {path_str(path)} ({spec.module})'
    if not isinstance(node, Mapping) or 'kernel' not in node:
      raise ValueError(
          f'{where}: `layers` lists it but params/{path_str(path)} has no'
          ' "kernel". Were the layers found on another model?'
      )
    # Boxed parameters (nn.Partitioned, NNX Variables) hold the array, or
    # the MaskedNode of a mask given per array rather than per box.
    kernel = _boxes.unbox(node['kernel'])
    kernel_masked = isinstance(kernel, optax.MaskedNode)
    bias = _boxes.unbox(node.get('bias'))
    if spec.has_bias and bias is None:
      raise ValueError(f'{where}: params/{path_str(path)} has no "bias".')
    if spec.has_bias and isinstance(bias, optax.MaskedNode) != kernel_masked:
      raise ValueError(
          f'{where}: kernel and bias are preconditioned jointly and must be'
          ' masked (or partitioned) together.'
      )
    if kernel_masked:
      continue
    shape = tuple(np.shape(kernel))
    if shape != spec.kernel_shape:
      raise ValueError(
          f'{where}: kernel shape {shape}, expected {spec.kernel_shape}.'
      )
    active[path] = spec
  return active


def _inverse_power_of_two_scale(a: jax.Array) -> jax.Array:
  """``2**-e`` per row of ``a``, with ``2**e`` within a factor 2 of max|a|.

  1 for a zero row. The exponent is clipped so that both ``2**e`` and
  ``2**-e`` are normal float32 numbers.
  """
  _, exponent = jnp.frexp(jnp.max(jnp.abs(a), axis=-1))
  exponent = jnp.clip(exponent, -125, 125)
  return jnp.ldexp(jnp.ones(exponent.shape, a.dtype), -exponent)


def precondition(
    kernel: jax.Array,
    bias: jax.Array | None,
    mean_input: jax.Array,
    spec: _geometry.LayerSpec,
    damping: jax.Array,
    scale: str = 'reference',
) -> tuple[jax.Array, jax.Array | None]:
  r"""Applies MAC's rank-one preconditioner to one layer's gradient.

  With :math:`\hat G` the kernel gradient flattened to ``(d_in, out)`` with the
  bias gradient appended as the last row, and :math:`\hat a` the mean input,

  .. math::
    \hat G \leftarrow \hat G - \frac{\hat a (\hat a^\top \hat G)}
      {\lambda + \|\hat a\|^2}
    = \lambda (\hat a \hat a^\top + \lambda I)^{-1} \hat G,

  never forming a ``d x d`` matrix. ``scale='exact'`` divides by
  :math:`\lambda`, giving the damped inverse itself.

  Args:
    kernel: kernel gradient, shape ``spec.kernel_shape`` (as stored; it is
      transposed to canonical order and back when ``spec.kernel_axes`` says
      so).
    bias: bias gradient, shape ``spec.bias_shape``, or None without bias.
    mean_input: :math:`\hat a`, shape ``spec.stat_shape``.
    spec: the layer geometry.
    damping: :math:`\lambda`.
    scale: ``'reference'`` or ``'exact'``.

  Returns:
    The preconditioned ``(kernel, bias)`` gradients, in their own dtypes.
  """
  if _sharding.is_explicit(kernel, bias):
    # Gradients sharded over Explicit mesh axes (FSDP, tensor parallelism):
    # the reshapes below would need their output shardings spelled out.
    return _sharding.with_auto_axes(
        lambda kernel, bias, mean_input, damping: precondition(
            kernel, bias, mean_input, spec, damping, scale), (kernel, bias),
        kernel, bias, mean_input, jnp.asarray(damping, jnp.float32))
  stacks = int(np.prod(spec.stack_shape, dtype=np.int64))
  d_in = spec.dim - int(spec.has_bias)
  out = int(np.prod(spec.out_shape, dtype=np.int64)) // spec.blocks
  shape = (stacks, spec.blocks, out)
  kernel = spec.to_canonical(kernel)
  grad = kernel.astype(jnp.float32).reshape((stacks, d_in) + shape[1:])
  a = mean_input.astype(jnp.float32).reshape((stacks, spec.blocks, spec.dim))
  damping = jnp.asarray(damping, jnp.float32)
  # ‖â‖² overflows float32 once |â| ≳ 1.8e19. With â = s b for a power of
  # two s near max|â|, the update G - b (bᵀG) / (λ/s² + ‖b‖²) is the same,
  # and so is its float arithmetic (powers of two scale without rounding),
  # but it stays finite for any finite â.
  inverse_scale = _inverse_power_of_two_scale(a)
  a = a * inverse_scale[..., None]
  denominator = (damping * inverse_scale * inverse_scale
                 + jnp.sum(jnp.square(a), axis=-1))
  # The bias is the last input coordinate: kept apart to avoid concatenating.
  projection = jnp.einsum('snd,sdno->sno', a[..., :d_in], grad)
  if spec.has_bias:
    bias_grad = bias.astype(jnp.float32).reshape(shape)
    projection = projection + a[..., d_in, None] * bias_grad
  projection = projection / denominator[..., None]
  grad = grad - jnp.einsum('snd,sno->sdno', a[..., :d_in], projection)
  if scale == 'exact':
    grad = grad / damping
  new_kernel = spec.from_canonical(
      grad.reshape(kernel.shape).astype(kernel.dtype))
  if not spec.has_bias:
    return new_kernel, None
  bias_grad = bias_grad - a[..., d_in, None] * projection
  if scale == 'exact':
    bias_grad = bias_grad / damping
  return new_kernel, bias_grad.reshape(bias.shape).astype(bias.dtype)


def scale_by_mac(
    layers: _geometry.Layers,
    damping: jax.typing.ArrayLike = 1.0,
    stat_decay: jax.typing.ArrayLike = 0.95,
    t_cov: jax.typing.ArrayLike = 5,
    t_inv: jax.typing.ArrayLike = 50,
    *,
    scale: str = 'reference',
    allow_missing_stats: bool = False,
    axis_name: Any = None,
    second_moments: Any = None,
    second_moment_scale: str = 'unscaled',
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions each layer's gradient with its mean input activation.

  For every layer in ``layers`` (kernel and bias jointly, the bias as the last
  input coordinate) the gradient becomes

  .. math::
    \hat G \leftarrow \hat G - \frac{\hat a\,(\hat a^\top \hat G)}
      {\lambda + \|\hat a\|^2},

  the damped rank-one inverse :math:`\lambda(\hat a \hat a^\top +
  \lambda I)^{-1}` of the authors' code, applied matrix-free in ``O(d m)``.
  Other parameters pass through unchanged.

  The timeline follows the reference exactly. At step :math:`t` (counting from
  0): if :math:`t \bmod T_{cov} = 0` the EMA
  :math:`m \leftarrow \beta m + (1-\beta) \bar a` takes this step's statistic
  and :math:`k \leftarrow k + 1`; if :math:`t \bmod T_{inv} = 0` the
  preconditioner is refreshed to :math:`\hat a = m / (1 - \beta^k)`, and it is
  used unchanged until the next refresh. Both happen at :math:`t = 0`, where
  :math:`\hat a` is exactly the first batch's statistic.

  A layer whose statistic is not finite (NaN or Inf), has an entry beyond
  ``MAX_STATISTIC`` (1e24) in magnitude, or saw no rows (an empty batch,
  attention with every query masked) on a capture step skips that capture:
  its EMA keeps its previous value and the capture is not counted in its bias
  correction (``skipped_captures`` in the state), so one bad batch cannot
  poison the EMA for the rest of training. The preconditioner's arithmetic
  is finite for any finite statistic (it rescales :math:`\hat a` by a power
  of two before squaring, which changes no rounding).

  Layers given in ``second_moments`` (the reference's first-layer treatment)
  use the full damped inverse :math:`(\Sigma + \lambda I)^{-1} \hat G` of
  their input second moment :math:`\Sigma` instead (see
  :func:`input_second_moments`), recomputed from :math:`\Sigma` at every
  refresh; they need no statistics.

  Statistics are the ``mac_stats`` extra argument of ``update``, as returned by
  :func:`capture`. Pass them on every step; steps that are not capture steps
  ignore them.

  Args:
    layers: the preconditioned layers, from :func:`find_layers`. Empty
      ``layers`` are refused (nothing would be preconditioned) unless found
      with ``allow_empty=True``. ``init`` checks them against the params both
      ways: every layer's kernel is there, and every kernel belongs to a
      module the traced forward pass reached. Parameters may be boxed
      (``nn.with_logical_partitioning``, NNX ``Variable``\ s): updates keep
      their boxes.
    damping: :math:`\lambda > 0`, a scalar. Checked when concrete; an
      injected (traced) value below ``MIN_DAMPING`` (1e-20), or NaN, acts as
      ``MIN_DAMPING``.
    stat_decay: :math:`\beta \in [0, 1)`. Checked when concrete; an
      injected value is clamped into :math:`[0, 1 - 2^{-24}]` (NaN acts as
      0).
    t_cov: statistics period :math:`T_{cov}`, a positive integer (an
      injected value below 1 acts as 1).
    t_inv: preconditioner refresh period :math:`T_{inv}` (likewise).
    scale: ``'reference'`` (the authors' :math:`\lambda`-scaled inverse, whose
      eigenvalues lie in :math:`(0, 1]`) or ``'exact'`` (the damped inverse
      :math:`(\hat a \hat a^\top + \lambda I)^{-1}`, i.e. divided by
      :math:`\lambda`).
    allow_missing_stats: if True, ``update`` without ``mac_stats`` passes the
      gradient through unchanged (only for generic optax test batteries). By
      default it raises.
    axis_name: under ``shard_map`` or ``pmap``, the data-parallel axis name
      (or tuple of names): the incoming statistics are merged over it (each
      mean weighted by its row count, see :func:`all_reduce_stats`) before use,
      so that every replica preconditions with the global-batch statistic.
      Leave it None under ``jax.jit`` with sharded inputs, where the
      statistics already are global.
    second_moments: optional ``{module path...: {'second_moment': Σ}}`` from
      :func:`input_second_moments`; these layers get the exact factor. Each
      concrete :math:`\Sigma` must be finite, symmetric and positive
      semi-definite (up to float32 rounding), else a ``ValueError`` names the
      layer. For a
      restore target, ``jax.ShapeDtypeStruct`` leaves are accepted (the state
      then holds zeros until the checkpoint is restored into it).
    second_moment_scale: ``'unscaled'`` (the reference's
      :math:`(\Sigma + \lambda I)^{-1}`) or ``'damping'``
      (:math:`\lambda (\Sigma + \lambda I)^{-1}`, the scale the other layers
      have with ``scale='reference'``).

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`; its
    ``update`` takes ``mac_stats=`` as a keyword argument.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, mac_optax
    >>> model = nn.Dense(2)
    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> layers = mac_optax.find_layers(model.apply, {'params': params}, x)
    >>> tx = mac_optax.scale_by_mac(layers, damping=1.0)
    >>> state = tx.init(params)
    >>> y, stats = mac_optax.capture(model.apply)({'params': params}, x)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params, mac_stats=stats)
    >>> # â = [2, 3, 1]: 1 - (2 + 3 + 1) / (1 + 2**2 + 3**2 + 1**2) = 0.6
    >>> bool(jnp.allclose(updates['bias'], 0.6))
    True

  References:
    Seung, Lee and Ko, `MAC: An Efficient Gradient Preconditioning using Mean
    Activation Approximated Curvature <https://arxiv.org/abs/2506.08464>`_,
    ICDM 2025.
  """
  if not isinstance(layers, Mapping):
    raise TypeError(
        'layers must come from mac_optax.find_layers(model.apply, variables,'
        f' *example_inputs), got {type(layers).__name__}.'
    )
  if not layers and not getattr(layers, 'allow_empty', False):
    raise ValueError(
        '`layers` is empty: find_layers found no layer that MAC can'
        ' precondition, so this optimizer would train as plain SGD with'
        ' momentum. mac_optax.summary(layers, params) says why each'
        ' parameter is left out; custom layers need'
        ' mac_optax.register_layer / register_attention. To train without'
        ' preconditioning anyway, call find_layers(..., allow_empty=True).'
    )
  if scale not in _SCALES:
    raise ValueError(f'scale must be one of {_SCALES}, got {scale!r}.')
  if second_moment_scale not in _SECOND_MOMENT_SCALES:
    raise ValueError(
        f'second_moment_scale must be one of {_SECOND_MOMENT_SCALES}, got'
        f' {second_moment_scale!r}.'
    )
  # Before the range checks: a rounded value may be out of range (1.0).
  _check_full_precision('damping', damping)
  _check_full_precision('stat_decay', stat_decay)
  for name, value in (('damping', damping), ('stat_decay', stat_decay),
                      ('t_cov', t_cov), ('t_inv', t_inv)):
    _check_scalar(name, value)
  _validate_hyperparameters(damping, stat_decay, t_cov, t_inv)
  exact_moments = (
      {} if second_moments is None
      else _check_second_moments(layers, second_moments)
  )

  def init_fn(params):
    if not isinstance(params, Mapping):
      # optax.tree.map_params calls init with a placeholder instead of the
      # params, to find the parameter-shaped parts of the state. Which layers
      # have statistics depends on the params (optax.masked/partition leave
      # some out), so each per-layer field is one opaque leaf here, standing
      # for the whole field of the real state.
      return ScaleByMacState(
          count=jnp.zeros([], jnp.int32),
          stat_count=jnp.zeros([], jnp.int32),
          mean_input_ema=_PerLayerFields(),
          mean_input=_PerLayerFields(),
          skipped_captures=_PerLayerFields(),
          exact_factors=_PerLayerFields(),
      )
    active = _active_layers(layers, params)
    _check_unlisted_kernels(layers, params)
    rank_one = {p: s for p, s in active.items() if p not in exact_moments}
    zeros = nest({
        path: jnp.zeros(spec.stat_shape, jnp.float32)
        for path, spec in rank_one.items()
    })
    exact = {}
    for path, moment in exact_moments.items():
      if path not in active:
        continue
      if isinstance(moment, jax.ShapeDtypeStruct):
        moment = jnp.zeros(moment.shape, jnp.float32)
      moment = jnp.asarray(moment, jnp.float32)
      exact[path] = {SECOND_MOMENT: moment, _INVERSE: jnp.zeros_like(moment)}
    return ScaleByMacState(
        count=jnp.zeros([], jnp.int32),
        stat_count=jnp.zeros([], jnp.int32),
        mean_input_ema=zeros,
        mean_input=jax.tree.map(jnp.copy, zeros),
        skipped_captures=nest(
            {path: jnp.zeros([], jnp.int32) for path in rank_one}, _SKIPPED
        ),
        exact_factors=_stats.nest(exact),
    )

  def reduce_stats(mac_stats):
    try:
      return _stats.all_reduce(mac_stats, axis_name)
    except NameError as error:
      raise ValueError(
          f'scale_by_mac(axis_name={axis_name!r}) merges the statistics over'
          ' that axis, so its update must run inside shard_map or pmap with'
          ' that axis name. Under jax.jit with sharded inputs the statistics'
          ' already are global: leave axis_name=None.'
      ) from error

  def update_fn(updates, state, params=None, *, mac_stats=None, **extra_args):
    del params, extra_args
    _reject_optax_multisteps()
    if mac_stats is None:
      if allow_missing_stats:
        return updates, state._replace(count=optax.safe_increment(state.count))
      raise ValueError(
          'scale_by_mac needs the layer statistics: call'
          ' tx.update(grads, state, params, mac_stats=stats) with the stats'
          ' returned by mac_optax.capture(model.apply). With flax\'s'
          ' TrainState, use mac_optax.TrainState (or TrainStateMixin) and'
          ' state.apply_gradients(grads=grads, mac_stats=stats).'
      )
    stats = _stats.mean_inputs(mac_stats)
    emas = _stats.mean_inputs(state.mean_input_ema)
    mean_inputs = _stats.mean_inputs(state.mean_input)
    skipped = _unnest(state.skipped_captures, _SKIPPED, 'skipped_captures')
    moments = _unnest(state.exact_factors, SECOND_MOMENT, 'exact_factors',
                      (_INVERSE,))
    inverses = _unnest(state.exact_factors, _INVERSE, 'exact_factors',
                       (SECOND_MOMENT,))
    _check_state_against_layers(layers, emas, mean_inputs, skipped, moments)
    for path, stat in stats.items():
      spec = layers.require(path, 'mac_stats has a statistic')
      dtype = jnp.result_type(stat)
      if not jnp.issubdtype(dtype, jnp.floating):
        # An integer mean would be truncated, a complex one is meaningless.
        raise ValueError(
            f'mac_stats for layer {path_str(path)} ({spec.module}) has dtype'
            f' {jnp.dtype(dtype).name}; statistics are float means, as'
            ' mac_optax.capture returns them.'
        )
    for path in emas:
      spec = layers[path]
      if path not in stats:
        raise ValueError(
            f'mac_stats has no statistic for layer {path_str(path)}'
            f' ({spec.module}); expected mean_input of shape'
            f' {spec.stat_shape}.'
        )
      if tuple(np.shape(stats[path])) != spec.stat_shape:
        raise ValueError(
            f'mac_stats for layer {path_str(path)} ({spec.module}) has shape'
            f' {tuple(np.shape(stats[path]))}, expected {spec.stat_shape}.'
        )
    if axis_name is not None:
      mac_stats = reduce_stats(mac_stats)
      stats = _stats.mean_inputs(mac_stats)
    counts = _stats.row_counts(mac_stats)

    count = state.count
    capture_now = count % _guarded_period(t_cov) == 0
    refresh_now = count % _guarded_period(t_inv) == 0
    stat_count = state.stat_count + capture_now.astype(jnp.int32)
    decay = _guarded_decay(stat_decay)
    safe_damping = _guarded_damping(damping)
    new_emas, new_means, new_skipped = {}, {}, {}
    for path, ema in emas.items():
      # Replicated like the EMA: statistics made outside capture may be
      # sharded over Explicit mesh axes, and where() needs one sharding.
      stat = _sharding.replicated(stats[path]).astype(jnp.float32)
      usable = _usable(stat, counts.get(path, ()))
      ema = jnp.where(
          capture_now & usable, decay * ema + (1.0 - decay) * stat, ema
      )
      new_emas[path] = ema
      new_skipped[path] = skipped[path] + (capture_now & ~usable).astype(
          jnp.int32
      )
      # Bias correction counts only the captures this layer's EMA took.
      taken = stat_count - new_skipped[path]
      refresh_layer = refresh_now & (taken > 0)
      correction = 1.0 - decay ** taken.astype(jnp.float32)
      new_means[path] = jnp.where(
          refresh_layer, ema / jnp.where(refresh_layer, correction, 1.0),
          mean_inputs[path],
      )

    new_exact = {}
    for path, moment in moments.items():
      # Recomputed at refreshes only, so an injected damping acts like a
      # refreshed statistic and the cubic cost is paid every t_inv steps.
      inverse = jax.lax.cond(
          refresh_now,
          lambda moment: _damped_inverse(moment, safe_damping,
                                         second_moment_scale),
          lambda _, old=inverses[path]: old,
          moment,
      )
      new_exact[path] = {SECOND_MOMENT: moment, _INVERSE: inverse}

    preconditioned = {}
    for path in list(new_means) + list(new_exact):
      spec = layers[path]
      node = _geometry.lookup(updates, path)
      if not isinstance(node, Mapping):
        node = {}
      kernel = _boxes.unbox(node.get('kernel'))
      bias = _boxes.unbox(node.get('bias'))
      if kernel is None or (spec.has_bias and bias is None):
        raise ValueError(
            f'layer {path_str(path)} ({spec.module}): the updates have no'
            f' {"kernel" if kernel is None else "bias"} at'
            f' {path_str(path)}; they must have the structure of params.'
        )
      bias = bias if spec.has_bias else None
      if path in new_exact:
        new_kernel, new_bias = _precondition_exact(
            kernel, bias, new_exact[path][_INVERSE], spec
        )
      else:
        new_kernel, new_bias = precondition(
            kernel, bias, new_means[path], spec, safe_damping, scale
        )
      preconditioned[path + ('kernel',)] = new_kernel
      if spec.has_bias:
        preconditioned[path + ('bias',)] = new_bias

    def replace(keys, leaf):
      path = tuple(_geometry.key_name(k) for k in keys)
      if path not in preconditioned:
        return leaf
      new = preconditioned[path]
      # A boxed update keeps its box: sharding names survive the step.
      return _boxes.rebox(leaf, new)

    updates = jax.tree_util.tree_map_with_path(
        replace, updates, is_leaf=_boxes.is_leaf_box
    )
    new_state = ScaleByMacState(
        count=optax.safe_increment(count),
        stat_count=stat_count,
        mean_input_ema=nest(new_emas),
        mean_input=nest(new_means),
        skipped_captures=nest(new_skipped, _SKIPPED),
        exact_factors=_stats.nest(new_exact),
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
