"""K-FAC (``kfac-jax``) as a demo optimizer, with the demo's step interface.

``kfac_jax.Optimizer`` is not an optax transformation: it differentiates the
loss itself, finds the layers by tracing it, and takes the batch and the
model's other collections (BatchNorm statistics) as arguments. This module
wraps it into the demo's ``step(params, state, opt_state, batch) -> (params,
state, opt_state, loss)``, with the demo's warmup-cosine learning rate,
constant momentum and damping, and the decoupled weight decay of MAC and
SGD-momentum applied after each K-FAC step under the demo's decay mask.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

# The authors' K-FAC baseline uses momentum 0.9 and the MAC/SGD weight decay;
# damping and the learning rate are tuned.
KFAC_HPARAMS = dict(momentum=0.9, damping=0.1, curvature_ema=0.95,
                    inverse_update_period=5, weight_decay=1e-4)


def _bind_params_compatible() -> None:
  """Lets ``kfac-jax`` 0.0.8 evaluate equations under JAX 0.7 and later.

  ``kfac-jax`` re-evaluates the traced model one equation at a time, and its
  0.0.8 release expects ``Primitive.get_bind_params`` to return
  ``(subfunctions, params)``; newer JAX returns the params alone, so every
  K-FAC step fails with "too many values to unpack". Where that is the case
  this replaces the one evaluation helper with one that accepts both forms;
  it changes nothing where ``kfac-jax`` already matches the installed JAX.
  """
  from kfac_jax._src import tag_graph_matcher  # pylint: disable=g-import-not-at-top
  import jax.extend as jex  # pylint: disable=g-import-not-at-top
  if getattr(tag_graph_matcher, '_mac_optax_compatible', False):
    return
  bound = jex.core.Primitive('probe').get_bind_params({})
  if isinstance(bound, tuple):
    return  # the API kfac-jax expects

  def eval_jaxpr_eqn(eqn, in_values):
    params = eqn.primitive.get_bind_params(eqn.params)
    subfunctions = ()
    if isinstance(params, tuple):
      subfunctions, params = params
    with jex.source_info_util.user_context(eqn.source_info.traceback):
      output = eqn.primitive.bind(*subfunctions, *in_values, **params)
    return output if isinstance(output, list) else [output]

  tag_graph_matcher.eval_jaxpr_eqn = eval_jaxpr_eqn
  tag_graph_matcher._mac_optax_compatible = True  # pylint: disable=protected-access


def kfac_optimizer(task, schedule: Callable[[Any], Any], **hparams):
  """``kfac_jax.Optimizer`` for ``task.model`` with the demo's loss.

  Args:
    task: the demo task (model and loss weighting).
    schedule: learning rate of the step count.
    **hparams: overrides of :data:`KFAC_HPARAMS` (``weight_decay`` is not
      used here, see :func:`make_kfac_step`).

  Returns:
    The optimizer; its ``step`` takes the batch as ``batch=`` and the
    model's other collections as ``func_state=``.
  """
  import kfac_jax  # pylint: disable=g-import-not-at-top
  _bind_params_compatible()
  hp = {**KFAC_HPARAMS, **hparams}

  def loss_fn(params, state, batch):
    logits, new_state = task.model.apply(
        {'params': params, **state}, batch['inputs'], train=True,
        mutable=list(state))
    logits = logits.astype(jnp.float32)
    weights = batch['weights']
    total = jnp.maximum(jnp.sum(weights), 1.0)
    # K-FAC's loss is Σ loss / batch size; the demo's is the weighted mean.
    kfac_jax.register_softmax_cross_entropy_loss(
        logits, batch['targets'], mask=weights,
        weight=weights.shape[0] / total)
    losses = jax.nn.log_softmax(logits)
    losses = -jnp.take_along_axis(losses, batch['targets'][..., None],
                                  -1)[..., 0]
    return jnp.sum(losses * weights) / total, dict(new_state)

  return kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss_fn, has_aux=True),
      l2_reg=0.0,
      value_func_has_state=True,
      learning_rate_schedule=schedule,
      momentum_schedule=lambda _: hp['momentum'],
      damping_schedule=lambda _: hp['damping'],
      curvature_ema=hp['curvature_ema'],
      inverse_update_period=hp['inverse_update_period'],
      num_burnin_steps=0,
      multi_device=False,
  )


def make_kfac_step(task, schedule: Callable[[Any], Any], decay_mask,
                   seed: int, **hparams):
  """K-FAC for ``task.model``: ``(init, step)``.

  Args:
    task: the demo task (model and loss weighting).
    schedule: learning rate of the step count.
    decay_mask: ``params -> bool tree`` of the parameters that decay.
    seed: the key K-FAC samples its curvature estimate with.
    **hparams: overrides of :data:`KFAC_HPARAMS`.

  Returns:
    ``init(params, state, batch) -> opt_state`` and
    ``step(params, state, opt_state, batch) -> (params, state, opt_state,
    loss)``; ``step`` is jitted by K-FAC, so call it as it is.
  """
  hp = {**KFAC_HPARAMS, **hparams}
  optimizer = kfac_optimizer(task, schedule, **hp)
  key = jax.random.key(seed)

  @jax.jit
  def decay(params, count):
    rate = schedule(count) * hp['weight_decay']
    return jax.tree.map(lambda p, d: p - rate * p if d else p, params,
                        decay_mask(params))

  def init(params, state, batch):
    return optimizer.init(params, key, batch, state)

  def step(params, state, opt_state, batch):
    count = jnp.copy(opt_state.step_counter)  # K-FAC donates its state
    params, opt_state, state, stats = optimizer.step(
        params, opt_state, jax.random.fold_in(key, count), batch=batch,
        func_state=state)
    if hp['weight_decay']:
      params = decay(params, count)
    return params, state, opt_state, stats['loss']

  return init, step
