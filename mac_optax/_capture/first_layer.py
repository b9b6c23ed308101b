"""The reference's first-layer factor: a layer's full input second moment.

The authors' code preconditions its first layer (a ResNet stem, a ViT patch
embedding) with the exact damped inverse ``(Σ + λI)⁻¹`` of the uncentred
second moment ``Σ = E[x̃ x̃ᵀ]`` of its input rows ``x̃`` (im2col patches for a
convolution, with a trailing 1 for the bias), computed once by a pass over the
training data. :func:`input_second_moments` computes ``Σ`` for chosen layers;
``scale_by_mac(..., second_moments=...)`` uses it.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, get_args

import flax.linen as nn
from flax.core import scope as flax_scope
import jax
import jax.numpy as jnp
import numpy as np

from mac_optax import _geometry
from mac_optax import _second_moments
from mac_optax import _stats
from mac_optax._capture import rules

Path = _geometry.Path
path_str = _geometry.path_str
SECOND_MOMENT = _second_moments.SECOND_MOMENT
_COLLECTION = 'mac_second_moments'
# How batches weigh in the second moment: each batch alike (the reference),
# or each input row alike.
Weighting = Literal['batch', 'row']
_WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
_HIGHEST = jax.lax.Precision.HIGHEST


def _first_input(args, kwargs):
  return args[0] if args else kwargs['inputs']


class _MomentInterceptor:
  """Sows ``(Σ_r x̃_r x̃_rᵀ, rows)`` of every call of the chosen layers."""

  def __init__(self, layers: _geometry.Layers, paths: Sequence[Path]):
    self.layers = layers
    self.paths = frozenset(paths)

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    path = tuple(module.path)
    rule = rules.rule_of(module)
    if (
        context.method_name != '__call__'
        or module.is_initializing()
        or path not in self.paths
        or not hasattr(rule, 'rows')
    ):
      return next_fun(*args, **kwargs)
    inputs = jnp.asarray(_first_input(args, kwargs)).astype(jnp.float32)
    rows = rule.rows(module, inputs)
    if self.layers[path].has_bias:
      rows = jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)],
                             axis=1)
    outer = jnp.einsum('rd,re->de', rows, rows, precision=_HIGHEST)
    module.sow(_COLLECTION, 'moment', (outer, jnp.float32(rows.shape[0])))
    return next_fun(*args, **kwargs)


def _as_path(path: Any) -> Path:
  if isinstance(path, str):
    return tuple(path.split('/')) if path else ()
  return tuple(path)


def _as_args(batch: Any) -> tuple:
  return tuple(batch) if isinstance(batch, tuple) else (batch,)


def _first_called_layer(apply_fn, variables, args, layers, apply_kwargs):
  """The preconditioned layer the forward pass calls first."""
  order: list[Path] = []

  def note_order(next_fun, call_args, call_kwargs, context):
    path = tuple(context.module.path)
    if (
        context.method_name == '__call__'
        and not context.module.is_initializing()
        and path in layers
        and path not in order
    ):
      order.append(path)
    return next_fun(*call_args, **call_kwargs)

  def forward(variables, *args):
    with nn.intercept_methods(note_order):
      return apply_fn(variables, *args, **apply_kwargs)

  jax.eval_shape(forward, variables, *args)
  if not order:
    raise ValueError(
        'the forward pass called none of the preconditioned layers in'
        ' `layers`; pass paths= explicitly.'
    )
  return order[0]


def _check_path(layers: _geometry.Layers, path: Path) -> None:
  spec = layers.require(path, '`paths` asks')
  _geometry.check_exact_factor(spec, f'layer {path_str(path)} ({spec.module})')


def _lookup_sown(state: Mapping[str, Any], path: Path):
  node = state.get(_COLLECTION, {})
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return node.get('moment') if isinstance(node, Mapping) else None


class _NoProgressBar(contextlib.nullcontext):

  def update(self, _):
    pass


def _progress_bar(show: bool, **kwargs):
  """A tqdm bar, or a silent stand-in when hidden or tqdm is not installed."""
  if show:
    try:
      from tqdm import auto  # pylint: disable=g-import-not-at-top
    except ImportError:  # tqdm is an optional dependency (the demo extra).
      pass
    else:
      return auto.tqdm(**kwargs)
  return _NoProgressBar()


def input_second_moments(
    apply_fn: Callable[..., Any],
    variables: Any,
    batches: Iterable[Any],
    *,
    layers: _geometry.Layers,
    paths: Sequence[Any] | None = None,
    weighting: Weighting = 'batch',
    sharding: jax.sharding.Sharding | None = None,
    num_batches: int | None = None,
    progress: bool = True,
    **apply_kwargs,
) -> dict:
  r"""Full input second moments of chosen layers, from a pass over the data.

  For each chosen layer, with :math:`\tilde x_r` its input rows (tokens for
  ``Dense``/``DenseGeneral``, im2col patches in the kernel's
  ``(*kernel_size, C)`` layout for ``Conv``, with a trailing 1 when the layer
  has a bias), batch :math:`b` gives
  :math:`S_b = \frac{1}{R_b} \sum_r \tilde x_r \tilde x_r^\top`, and

  .. math::
    \Sigma = \frac{1}{n} \sum_{b=1}^{n} S_b \quad (\texttt{'batch'}, the
    reference) \qquad\text{or}\qquad
    \Sigma = \frac{\sum_b R_b S_b}{\sum_b R_b} \quad (\texttt{'row'}).

  ``'batch'`` weighs every batch equally, as the authors' ``_configure`` does
  (a smaller last batch counts as much as a full one); ``'row'`` is the
  second moment of all rows of the data. Pass the result as
  ``second_moments=`` to :func:`mac` or :func:`scale_by_mac`, which then
  precondition these layers with :math:`(\Sigma + \lambda I)^{-1}`.

  Every batch runs through ``apply_fn`` under ``jax.jit``; only the chosen
  layers' inputs are used, so XLA drops the rest of the forward pass. Each
  :math:`S_b` is a statistic of the whole (global) batch: with batches
  sharded over devices, or over processes through ``sharding=``, it is the
  same as on one device, unlike the reference's per-rank pass. Arithmetic is
  float32 at highest matmul precision, whatever the data's dtype.

  Args:
    apply_fn: ``model.apply`` (or its :func:`capture` wrapper).
    variables: the model variables, ``{'params': ..., ...}``.
    batches: an iterable of model inputs: each item is the positional
      argument(s) of ``apply_fn`` after ``variables`` (an array, or a tuple of
      them), e.g. ``(b['image'] for b in loader)``.
    layers: the preconditioned layers, from :func:`find_layers`.
    paths: module paths (tuples or ``'a/b'`` strings) of the layers to
      measure; by default the first preconditioned layer the forward pass
      calls (e.g. the patch embedding).
    weighting: ``'batch'`` (the reference) or ``'row'``.
    sharding: if given, every array of every batch is this process's part of
      a global batch with this sharding (``jax.make_array_from_process_local_
      data``), for multi-process data loading.
    num_batches: the number of batches, for the progress bar when ``batches``
      has no length.
    progress: show a ``tqdm`` progress bar (on process 0 only; needs tqdm,
      installed with the ``demo`` extra).
    **apply_kwargs: keyword arguments of ``apply_fn``, e.g. ``train=True``
      or ``mutable=['batch_stats']``.

  Returns:
    ``{module path...: {'second_moment': Σ}}`` (float32, ``d x d``), nested
    like ``mac_stats``.

  Raises:
    ValueError: naming the layer, when a batch gives a non-finite ``S_b`` (a
      NaN or Inf sample, or inputs so large that their squares overflow
      float32: the count of such batches is given) or ``Σ`` is not
      positive semi-definite, either of which would make every update of the
      layer NaN.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, mac_optax
    >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> variables = model.init(jax.random.key(0), x)
    >>> layers = mac_optax.find_layers(model.apply, variables, x)
    >>> moments = mac_optax.input_second_moments(
    ...     model.apply, variables, [x, x[:1]], layers=layers, progress=False)
    >>> # (S_1 + S_2) / 2: S_1 is the mean outer product of rows [1, 2, 1] and
    >>> # [3, 4, 1] (the trailing 1 for the bias), S_2 that of [1, 2, 1].
    >>> print(moments['layers_0']['second_moment'])
    [[3.  4.5 1.5]
     [4.5 7.  2.5]
     [1.5 2.5 1. ]]
    >>> tx = mac_optax.mac(0.1, layers=layers, second_moments=moments)
  """
  if weighting not in _WEIGHTINGS:
    raise ValueError(
        f'weighting must be one of {_WEIGHTINGS}, got {weighting!r}.'
    )
  if not isinstance(layers, Mapping):
    raise TypeError(
        'layers must come from mac_optax.find_layers(model.apply, variables,'
        f' *example_inputs), got {type(layers).__name__}.'
    )
  apply_fn = getattr(apply_fn, 'apply_fn', apply_fn)  # a capture wrapper
  iterator = iter(batches)
  try:
    first = next(iterator)
  except StopIteration:
    raise ValueError('input_second_moments got no batches.') from None

  def to_global(batch):
    args = _as_args(batch)
    if sharding is None:
      return args
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x)),
        args,
    )

  first_args = to_global(first)
  if paths is None:
    paths = [_first_called_layer(apply_fn, variables, first_args, layers,
                                 apply_kwargs)]
  paths = [_as_path(p) for p in paths]
  if not paths:
    raise ValueError('paths is empty: name at least one layer.')
  for path in paths:
    _check_path(layers, path)
  interceptor = _MomentInterceptor(layers, paths)
  mutable = flax_scope.union_filters(
      apply_kwargs.get('mutable', False), [_COLLECTION]
  )
  kwargs = {k: v for k, v in apply_kwargs.items() if k != 'mutable'}

  def batch_moments(variables, *args):
    with nn.intercept_methods(interceptor):
      _, state = apply_fn(variables, *args, mutable=mutable, **kwargs)
    moments = {}
    for path in paths:
      calls = _lookup_sown(state, path)
      if not calls:
        raise ValueError(
            f'layer {path_str(path)} was not called by apply_fn on this'
            ' batch, so its input second moment is unknown.'
        )
      total = sum(outer for outer, _ in calls)
      rows = sum(count for _, count in calls)
      moments[path] = (total / rows, rows)
    return moments

  @jax.jit
  def accumulate(totals, variables, *args):
    moments = batch_moments(variables, *args)
    new = {}
    for path, (batch_moment, rows) in moments.items():
      by_batch, by_row, all_rows, bad = totals[path]
      # Counted on device, reported at the end: no host sync per batch.
      bad = bad + (~jnp.all(jnp.isfinite(batch_moment))).astype(jnp.int32)
      new[path] = (by_batch + batch_moment, by_row + rows * batch_moment,
                   all_rows + rows, bad)
    return new

  totals = {
      path: (jnp.zeros((layers[path].dim,) * 2, jnp.float32),) * 2
      + (jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32))
      for path in paths
  }
  total_batches = num_batches
  if total_batches is None and hasattr(batches, '__len__'):
    total_batches = len(batches)
  bar = _progress_bar(
      progress and jax.process_index() == 0,
      total=total_batches,
      desc='input second moment of ' + ', '.join(map(path_str, paths)),
      unit='batch',
  )
  count = 0
  with bar:
    for index, batch in enumerate(itertools.chain([first], iterator)):
      args = first_args if index == 0 else to_global(batch)
      totals = accumulate(totals, variables, *args)
      count += 1
      bar.update(1)
  flat = {}
  for path, (by_batch, by_row, all_rows, bad) in totals.items():
    where = (f'the input second moment of layer {path_str(path)}'
             f' ({layers[path].module})')
    if int(bad):
      raise ValueError(
          f'{where}: {int(bad)} of {count} batches gave NaN or Inf (a sample'
          ' with non-finite inputs, or inputs so large, |x| beyond ~1.8e19,'
          ' that their squares overflow float32), which would make every'
          ' update of the layer NaN. Clean or rescale those batches.'
      )
    flat[path] = by_batch / count if weighting == 'batch' else by_row / all_rows
    _second_moments.check_second_moment(flat[path], where)
  return _stats.nest_nodes({path: {SECOND_MOMENT: m} for path, m in flat.items()})
