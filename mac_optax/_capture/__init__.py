"""Flax capture of MAC's statistics: the front door.

The public capture API lives here, and this is the one place that tells a
linen model from an NNX one (:func:`_capture_of`); what follows is per
framework, on a shared tracker:

* ``rules``, ``conv``: how each layer class is read (the rule table).
* ``tracking``: module calls to statistics, linen and NNX alike.
* ``linen``, ``module_apply``: linen's interceptor, ``Module.apply`` routing,
  and the ``Recording`` of a block of applies.
* ``nnx``, ``nnx_hooks``: NNX's storage of statistics, and its wrapped
  ``__call__`` (also serving NNX models inside linen).
* ``in_loss``: ``recording`` and ``with_stats``, capture inside a loss
  function around code one cannot wrap.
* ``layers``: the :class:`Layers` found, and ``summary``.
* ``first_layer``: the full input second moment of chosen layers.
* ``transformers``: rules for Hugging Face transformers' Flax models.
* ``common``: pieces the frameworks share (merging, errors, shape tracing).

Nothing in the optimizer imports this package.
"""

from __future__ import annotations

from typing import Any, Callable

from mac_optax import _geometry
from mac_optax._capture import first_layer
from mac_optax._capture import in_loss
from mac_optax._capture import layers as layers_lib
from mac_optax._capture import linen
from mac_optax._capture import nnx as nnx_lib
from mac_optax._capture import rules
from mac_optax._capture import tracking
# Imported for its effect: Hugging Face models get their rules once used.
from mac_optax._capture import transformers  # pylint: disable=unused-import

AttentionRule = rules.AttentionRule
Capture = linen.Capture
ConvLocalRule = rules.ConvLocalRule
ConvRule = rules.ConvRule
ConvTransposeRule = rules.ConvTransposeRule
DenseRule = rules.DenseRule
EinsumRule = rules.EinsumRule
LayerCall = rules.LayerCall
LayerRule = rules.LayerRule
PassThrough = rules.PassThrough
Statistic = rules.Statistic
input_second_moments = first_layer.input_second_moments
provide_attention_probabilities = tracking.provide_attention_probabilities
recording = in_loss.recording
register_attention = rules.register_attention
register_layer = rules.register_layer
rule_of = rules.rule_of
summary = layers_lib.summary
with_stats = in_loss.with_stats

# What find_layers accepts as already made captures.
_CAPTURES = (linen.Capture, nnx_lib.NNXCapture)


def _capture_of(
    target: Any, options: rules.Options, allow_empty: bool = False,
) -> linen.Capture | nnx_lib.NNXCapture:
  """The capture of ``target``: the one place that tells NNX from linen.

  An NNX module (or a bound method of one) is captured by wrapping its
  layers' ``__call__``; anything else is a linen ``model.apply`` or a
  function that calls it.
  """
  if nnx_lib.is_nnx(target):
    return nnx_lib.NNXCapture(target, options, allow_empty)
  return linen.Capture.with_options(target, options, allow_empty)


def capture(
    apply_fn: Callable[..., Any],
    *,
    attention_aware: bool = True,
    value_stat: rules.ValueStat = 'reference',
    depthwise_shared: bool = True,
    allow_empty: bool = False,
):
  r"""Wraps ``model.apply`` (linen) or a model (NNX) to also return MAC's statistics.

  Linen: ``capture(model.apply)`` takes the same arguments as ``model.apply``
  and returns ``(outputs, mac_stats)``; when ``mutable`` (or
  ``capture_intermediates``) makes ``apply`` return ``(outputs, state)``, it
  returns ``((outputs, state), mac_stats)``. NNX: ``capture(model)`` (or a
  bound method of it) is called like the model and returns ``(outputs,
  mac_stats)``. The model's outputs, its other collections and its gradients
  are unchanged.

  ``mac_stats`` is a nested dict keyed by module path, like the params, with
  one node of fp32 statistics per preconditioned layer (see ``_stats``); the
  preconditioner uses its ``mean_input``:

  * ``Dense`` / ``DenseGeneral`` / ``Einsum`` (NNX ``Linear`` /
    ``LinearGeneral`` / ``Einsum``): the mean of the input rows over batch and
    positions, contracted axes flattened in kernel order, with a trailing 1
    when the layer has a bias. Weights per batch index
    (``DenseGeneral(batch_dims=...)``) get one mean per index.
  * ``Conv``: the mean im2col patch in the kernel's ``(*kernel_size,
    in_features // groups)`` layout (plus 1 for the bias), computed from the
    batch-mean input without building patches. Grouped convolutions get one
    row per group; depthwise convolutions share one patch over channels (as
    the reference does) unless ``depthwise_shared=False``. ``ConvTranspose``
    gets the mean patch of the stride-1 convolution it computes, ``ConvLocal``
    one mean patch per output position.
  * The value projection of attention modules (Flax's own, and those declared
    with :func:`register_attention`): the attention-weighted mean input
    :math:`v = \sum_j \bar p_j \bar x_j`, with :math:`\bar p_j` the attention
    that key :math:`j` receives, averaged over batch, heads and unmasked query
    rows, under the module's mask, and :math:`\bar x_j` the batch-mean value
    input at key position :math:`j`. ``value_stat='per_head'`` gives one row
    per head instead, the mean over batch and queries of :math:`\sum_j
    A_{bhij} x_{bj}`. A fused query/key/value projection gets the plain
    statistic on its query and key blocks and this one on its value blocks.

  A layer called several times gets the statistic of all its calls' rows.
  Statistics are ``stop_gradient``-ed and cost no backward work.

  The interceptor is installed inside the call, so call the wrapped function
  inside your traced (jitted, differentiated) loss function. Calls during
  ``model.init`` and autoregressive decoding record nothing.

  Attention probabilities come from the model itself where it can hand them
  over (linen: ``sow_weights``, stripped from the returned intermediates
  again; NNX: through its ``attention_fn``); otherwise they are recomputed as
  ``softmax(q kᵀ / √d)`` under the module's mask from the intercepted (and
  normalised) projections.

  Layers inside ``nn.scan`` need no change to the model: their statistics
  come out stacked like their kernels.

  A wrapper of ``model.apply`` is captured like ``model.apply`` itself: every
  ``Module.apply`` it reaches is captured (several merge, as in
  :func:`recording`), and applies made inside a captured one (a tied decoder)
  are part of it. A ``jax.jit``-ed function given here is run unjitted inside
  the caller's trace; an ``apply`` reached inside a JAX transformation that
  the wrapper applies itself (a nested ``jax.jit``, ``jax.vmap``) raises,
  since its statistics could not leave it.

  For a subclass of a known layer that overrides ``__call__`` (``class
  Scaled(nn.Dense)`` calling ``super().__call__(2 * x)``), the statistic is
  that of the input the layer class's own ``__call__`` receives, which is what
  the kernel multiplies.

  Args:
    apply_fn: a linen ``model.apply``, or any function that calls it (directly
      or through other functions; it is called with the arguments given and
      its result returned unchanged), or an NNX module (or bound method of
      one).
    attention_aware: give attention value projections the attention-weighted
      statistic; ``False`` treats them as plain layers.
    value_stat: ``'reference'`` (one head-averaged vector, the authors'
      statistic) or ``'per_head'``.
    depthwise_shared: share one mean patch over the channels of a depthwise
      convolution, as the reference does.
    allow_empty: accept a call that records no statistics. Otherwise a call
      that records none raises when the parameters have kernels (naming the
      modules that own them), or when a wrapper ran no ``Module.apply``.

  Returns:
    A callable returning ``(result, mac_stats)``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, mac_optax
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((4, 2))
    >>> variables = model.init(jax.random.key(0), x)
    >>> y, stats = mac_optax.capture(model.apply)(variables, x)
    >>> stats['mean_input']
    Array([1., 1., 1.], dtype=float32)
  """
  options = rules.Options(attention_aware, value_stat, depthwise_shared)
  return _capture_of(apply_fn, options, allow_empty)


def find_layers(apply_fn: Callable[..., Any], *args, params: Any = None,
                allow_empty: bool = False, **kwargs) -> _geometry.Layers:
  """Finds the layers MAC preconditions by tracing one forward pass.

  The forward pass runs under ``jax.eval_shape``, so it costs no FLOPs. Pass
  the same arguments as in training (including ``mutable=['batch_stats']``,
  ``rngs=`` or a ``train`` flag): layers that a different call would skip are
  not found.

  A model whose training call uses a collective over a named axis (a
  ``BatchNorm(axis_name='batch')`` meant for ``pmap``/``shard_map``) is traced
  with that axis bound, of size 1: the names come from the error JAX raises
  for an unbound one. The layers found are those of the per-device call.

  When no layer is found although the parameters have kernels, it raises,
  naming the modules that own them (teach MAC their classes with
  :func:`register_layer`), unless ``allow_empty=True``. Modules that own a
  kernel but have no rule, beside layers found, get a warning naming them.

  Linen: ``find_layers(model.apply, variables, *args, **kwargs)``. NNX:
  ``find_layers(model, *args, **kwargs)``; the model is not changed. A loss
  function decorated with :func:`with_stats` (for models called inside code
  you do not own): ``find_layers(loss_fn, *args, params=params, **kwargs)``,
  where ``params`` is the parameter tree the optimizer will see (NNX models
  among ``args`` provide their own).

  Args:
    apply_fn: ``model.apply`` (linen) or a function that calls it (whose
      first argument is the variables or the parameter tree), the model
      (NNX), or the :func:`capture` wrapper used for training when it was
      built with non-default options.
    *args: the arguments of the call: for linen the variables
      (``{'params': ..., ...}``) and then the inputs.
    params: with a :func:`with_stats` function, the parameters of its linen
      models.
    allow_empty: accept finding no layer where the model has kernels (the
      returned ``Layers`` then has ``allow_empty = True``, which
      :func:`scale_by_mac` requires to run without layers).
    **kwargs: keyword arguments of the call.

  Returns:
    A :class:`Layers` mapping, to pass as ``layers=`` to :func:`mac` or
    :func:`scale_by_mac`.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, mac_optax
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((4, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> mac_optax.find_layers(model.apply, variables, x)
    Layers(layers_0, layers_2)
  """
  survey = tracking.Survey()
  decorated = getattr(apply_fn, in_loss.WITH_STATS_ATTRIBUTE, None)
  if decorated is not None:
    stats, found_params, nnx_models = decorated.trace(survey, args, kwargs)
    params = found_params if params is None else params
    if params is None:
      raise TypeError(
          'find_layers(loss_fn, *args, params=...): give the parameter tree of'
          ' the linen models the loss function calls.'
      )
  else:
    target = (apply_fn if isinstance(apply_fn, _CAPTURES)
              else _capture_of(apply_fn, rules.Options()))
    stats, params, nnx_models = target.trace(survey, args, kwargs)
  return layers_lib.layers_from(survey, stats, params, allow_empty, nnx_models)


__all__ = (
    'AttentionRule',
    'Capture',
    'ConvLocalRule',
    'ConvRule',
    'ConvTransposeRule',
    'DenseRule',
    'EinsumRule',
    'LayerCall',
    'LayerRule',
    'PassThrough',
    'Statistic',
    'capture',
    'find_layers',
    'input_second_moments',
    'provide_attention_probabilities',
    'recording',
    'register_attention',
    'register_layer',
    'rule_of',
    'summary',
    'with_stats',
)
