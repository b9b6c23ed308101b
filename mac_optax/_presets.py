"""MAC presets: MAC beside or before another optimizer, in one call."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from mac_optax import _geometry
from mac_optax import _alias

PRECONDITIONED = 'mac'
REST = 'rest'


def layer_labels(layers: _geometry.Layers) -> Callable[[Any], Any]:
  """``params -> labels``: ``'mac'`` where MAC preconditions, else ``'rest'``.

  The ``param_labels`` of :func:`optax.partition` for :func:`mac_adamw`,
  built on :func:`precondition_mask`.
  """
  def labels(params):
    return jax.tree.map(
        lambda preconditioned: PRECONDITIONED if preconditioned else REST,
        _geometry.precondition_mask(layers, params))
  return labels


def mac_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    layers: _geometry.Layers,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    rest: optax.GradientTransformation | None = None,
    momentum: jax.typing.ArrayLike = 0.9,
    weight_decay: jax.typing.ArrayLike = 5e-4,
    damping: jax.typing.ArrayLike = 1.0,
    stat_decay: jax.typing.ArrayLike = 0.95,
    t_cov: jax.typing.ArrayLike = 5,
    t_inv: jax.typing.ArrayLike = 50,
    nesterov: bool = False,
    weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
    adam_b1: jax.typing.ArrayLike = 0.9,
    adam_b2: jax.typing.ArrayLike = 0.999,
    adam_eps: jax.typing.ArrayLike = 1e-8,
    adam_weight_decay: jax.typing.ArrayLike = 1e-4,
    **mac_options,
) -> optax.GradientTransformationExtraArgs:
  r"""MAC on the layers it preconditions, AdamW on every other parameter.

  Muon's convention, with MAC in Muon's place: the kernels and biases that
  :func:`find_layers` found (``precondition_mask`` is True) get :func:`mac`
  (preconditioner, heavy-ball momentum, decoupled weight decay, learning
  rate); everything else (embeddings, norm scales, position tables,
  parameters of layers MAC does not know) gets :func:`optax.adamw`, or the
  transform given as ``rest``. Built as :func:`optax.partition` with labels
  from :func:`layer_labels`, so the state is the two optimizers' states side
  by side.

  Use it where a model has many parameters outside its Dense/Conv kernels
  that plain momentum trains poorly, such as a character or token model's
  embedding table.

  Args:
    learning_rate: MAC's :math:`\eta`, a scalar or an optax schedule.
    layers: the preconditioned layers, from :func:`find_layers`.
    adam_learning_rate: AdamW's learning rate; required unless ``rest`` is
      given (AdamW wants a far smaller one than MAC).
    rest: the transform for the other parameters instead of AdamW (the
      ``adam_*`` arguments then do not apply).
    momentum: MAC's heavy-ball momentum.
    weight_decay: MAC's decoupled weight decay.
    damping: :math:`\lambda > 0`, see :func:`scale_by_mac`.
    stat_decay: see :func:`scale_by_mac`.
    t_cov: see :func:`scale_by_mac`.
    t_inv: see :func:`scale_by_mac`.
    nesterov: MAC's Nesterov momentum, see :func:`mac`.
    weight_decay_mask: which parameters decay, in both parts (a bool tree or
      a callable of params, as for ``optax.add_decayed_weights``).
    adam_b1: AdamW's :math:`\beta_1`.
    adam_b2: AdamW's :math:`\beta_2`.
    adam_eps: AdamW's :math:`\epsilon`.
    adam_weight_decay: AdamW's decoupled weight decay.
    **mac_options: ``scale``, ``axis_name``, ``second_moments``,
      ``second_moment_scale``, passed to :func:`mac`.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`; its
    ``update`` takes ``mac_stats=`` from :func:`capture`.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, mac_optax
    >>> model = nn.Sequential([nn.Embed(10, 8), nn.LayerNorm(), nn.Dense(10)])
    >>> tokens = jnp.arange(6).reshape(2, 3)
    >>> variables = model.init(jax.random.key(0), tokens)
    >>> layers = mac_optax.find_layers(model.apply, variables, tokens)
    >>> tx = mac_optax.mac_adamw(0.1, layers=layers, adam_learning_rate=1e-3)
    >>> state = tx.init(variables['params'])
    >>> print(mac_optax.layer_labels(layers)(variables['params']))
    {'layers_0': {'embedding': 'rest'}, 'layers_1': {'bias': 'rest', 'scale': 'rest'}, 'layers_2': {'bias': 'mac', 'kernel': 'mac'}}
  """
  if rest is None:
    if adam_learning_rate is None:
      raise ValueError(
          'mac_adamw needs adam_learning_rate (AdamW, for the parameters MAC'
          ' does not precondition, wants a far smaller rate than MAC), or a'
          ' transform for those parameters as `rest`.')
    rest = optax.adamw(adam_learning_rate, b1=adam_b1, b2=adam_b2,
                       eps=adam_eps, weight_decay=adam_weight_decay,
                       mask=weight_decay_mask)
  elif adam_learning_rate is not None:
    raise ValueError(
        'mac_adamw: adam_learning_rate configures the default AdamW, but'
        ' `rest` replaces it; give `rest` its own learning rate.')
  preconditioned = _alias.mac(
      learning_rate, layers=layers, momentum=momentum,
      weight_decay=weight_decay, damping=damping, stat_decay=stat_decay,
      t_cov=t_cov, t_inv=t_inv, nesterov=nesterov,
      weight_decay_mask=weight_decay_mask, **mac_options)
  return optax.partition({PRECONDITIONED: preconditioned, REST: rest},
                         layer_labels(layers))


def preconditioned(
    inner: optax.GradientTransformation,
    *,
    layers: _geometry.Layers,
    damping: jax.typing.ArrayLike = 1.0,
    stat_decay: jax.typing.ArrayLike = 0.95,
    t_cov: jax.typing.ArrayLike = 5,
    t_inv: jax.typing.ArrayLike = 50,
    **mac_options,
) -> optax.GradientTransformationExtraArgs:
  r"""MAC's preconditioner in front of another optimizer's moments.

  ``optax.chain(scale_by_mac(layers, ...), inner)``: each preconditioned
  layer's gradient becomes :math:`G (I - \hat a \hat a^\top / (\lambda +
  \|\hat a\|^2))` before ``inner`` (AdamW, ``optax.contrib.muon``, ...) sees
  it, so ``inner``'s momentum and second moments are of the preconditioned
  gradient; other parameters reach ``inner`` unchanged. ``inner`` keeps its
  own learning rate, schedule and weight decay.

  MAC's correction removes the gradient's component along the layer's mean
  input, which dominates when inputs share a large common part (a
  post-activation mean, a token embedding's bias); an adaptive ``inner``
  then no longer spends its step size on that one direction.

  Args:
    inner: the optimizer that follows, e.g. ``optax.adamw(3e-3)``.
    layers: the preconditioned layers, from :func:`find_layers`.
    damping: :math:`\lambda > 0`, see :func:`scale_by_mac`.
    stat_decay: see :func:`scale_by_mac`.
    t_cov: see :func:`scale_by_mac`.
    t_inv: see :func:`scale_by_mac`.
    **mac_options: other arguments of :func:`mac` (``scale``,
      ``axis_name``, ``second_moments``, ``second_moment_scale``).

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`; its
    ``update`` takes ``mac_stats=`` from :func:`capture` (``inner`` gets the
    same extra arguments).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, mac_optax
    >>> model = nn.Dense(2)
    >>> x = jnp.ones((4, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> layers = mac_optax.find_layers(model.apply, variables, x)
    >>> tx = mac_optax.preconditioned(optax.adamw(1e-3), layers=layers,
    ...                               damping=3.0)
    >>> state = tx.init(variables['params'])
    >>> type(state[0]).__name__
    'ScaleByMacState'
  """
  return optax.chain(
      *_alias.preconditioners(layers, damping, stat_decay, t_cov, t_inv,
                              **mac_options),
      inner,
  )
