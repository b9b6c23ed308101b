"""The demo's training loop, optimizers and learning-rate sweep.

Every optimizer gets the same steps, batches (same seed, same order), warmup +
cosine schedule and weight-decay mask; only the update rule and its learning
rate differ. SGD-momentum is MAC's own chain without the preconditioner, so
the two differ by preconditioning alone. Besides MAC (``mac``), its presets
``mac_adamw`` (MAC on the layers it preconditions, AdamW on the rest) and
``pre_muon`` / ``pre_adamw`` (MAC's preconditioner in front of Muon / AdamW)
run against AdamW, SGD-momentum, ``optax.contrib.muon`` and K-FAC
(``kfac-jax``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import mac_optax
from mac_optax.demo import models
from mac_optax.demo import tasks as tasks_lib

OPTIMIZERS = ('mac', 'mac_adamw', 'pre_muon', 'pre_adamw', 'adamw', 'sgd',
              'muon', 'kfac')
OPTIMIZER_LABELS = {'mac': 'MAC', 'mac_adamw': 'MAC + AdamW',
                    'pre_muon': 'MAC → Muon', 'pre_adamw': 'MAC → AdamW',
                    'adamw': 'AdamW', 'sgd': 'SGD-momentum', 'muon': 'Muon',
                    'kfac': 'K-FAC'}
# The optimizers that capture MAC's statistics.
MAC_FAMILY = ('mac', 'mac_adamw', 'pre_muon', 'pre_adamw')
# The optimizers with a second, Adam learning rate (Muon's convention: Adam on
# the parameters the first part does not take).
TWO_RATES = ('mac_adamw', 'pre_muon', 'muon')
# The authors' DeiT setting (weight decay 1e-4 is decoupled, as in their
# ImageNet code); only the learning rate is tuned per task.
MAC_HPARAMS = dict(momentum=0.9, damping=3.0, stat_decay=0.99, t_cov=5,
                   t_inv=5, weight_decay=1e-4)
SGD_HPARAMS = dict(momentum=0.9, weight_decay=1e-4)
ADAMW_HPARAMS = dict(b1=0.9, b2=0.999, weight_decay=0.05)
# optax.contrib.muon's defaults (momentum 0.95, Nesterov, Adam for what is not
# a matrix), with AdamW's decoupled weight decay in both parts.
MUON_HPARAMS = dict(beta=0.95, weight_decay=0.05, adam_b1=0.9, adam_b2=0.999,
                    adam_weight_decay=0.05)
# Parameters that never decay, besides every vector (biases, norm scales).
NO_DECAY_NAMES = ('pos', 'cls')


@dataclasses.dataclass(frozen=True)
class Budget:
  """How long every optimizer trains.

  Attributes:
    steps: optimizer steps.
    batch_size: rows per step.
    warmup_steps: linear warmup from 0, then cosine decay to 0.
    eval_every: steps between evaluations (also the first and last step).
  """

  steps: int
  batch_size: int
  warmup_steps: int
  eval_every: int

  def eval_steps(self) -> list[int]:
    points = list(range(0, self.steps, self.eval_every)) + [self.steps]
    return sorted(set(points))


@dataclasses.dataclass
class History:
  """One training run.

  Attributes:
    task: task name.
    optimizer: a name in ``OPTIMIZERS``.
    learning_rate: peak learning rate.
    seed: init and data-order seed.
    metric: the eval metric (``'accuracy'`` or ``'loss'``).
    eval_name: what was evaluated (``'test'``, ``'held-out'``).
    steps: steps done at each evaluation.
    seconds: training seconds (no compile, no evaluation) at each evaluation.
    train_loss: mean training loss over the steps since the previous
      evaluation (NaN at step 0).
    eval_loss: eval loss at each evaluation.
    eval_accuracy: eval accuracy (of the weighted targets) at each evaluation.
    compile_seconds: time to compile the training step.
    setup_seconds: time before the first step (MAC's first-layer pass over
      the training data), included in ``seconds``.
    examples: rows trained on.
    params: number of parameters.
    device: the device kind trained on.
    adam_learning_rate: the peak Adam learning rate of the optimizers in
      ``TWO_RATES``; None for the others.
    error: why the optimizer could not train this model (then the curves
      are empty), e.g. K-FAC on a layer kind it does not support.
  """

  task: str
  optimizer: str
  learning_rate: float
  seed: int
  metric: str
  eval_name: str
  steps: list[int] = dataclasses.field(default_factory=list)
  seconds: list[float] = dataclasses.field(default_factory=list)
  train_loss: list[float] = dataclasses.field(default_factory=list)
  eval_loss: list[float] = dataclasses.field(default_factory=list)
  eval_accuracy: list[float] = dataclasses.field(default_factory=list)
  compile_seconds: float = 0.0
  setup_seconds: float = 0.0
  examples: int = 0
  params: int = 0
  device: str = ''
  adam_learning_rate: float | None = None
  error: str = ''

  @property
  def curve(self) -> list[float]:
    """The eval metric at each evaluation."""
    return self.eval_accuracy if self.metric == 'accuracy' else self.eval_loss

  @property
  def final(self) -> float:
    return self.curve[-1] if self.curve else math.nan

  @property
  def train_seconds(self) -> float:
    return self.seconds[-1] if self.seconds else math.nan

  @property
  def steps_per_second(self) -> float:
    if not self.steps:
      return math.nan
    return self.steps[-1] / max(self.seconds[-1], 1e-9)

  @property
  def rates(self) -> str:
    """The peak learning rate(s): ``'0.02'``, or ``'0.02 / 0.003'`` (Adam's)."""
    if self.adam_learning_rate is None:
      return f'{self.learning_rate:g}'
    return f'{self.learning_rate:g} / {self.adam_learning_rate:g}'

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, values: dict[str, Any]) -> 'History':
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in fields})


def decay_mask(params) -> Any:
  """True for matrices and kernels; no decay for vectors, ``pos`` and ``cls``."""
  def decays(path, leaf):
    name = getattr(path[-1], 'key', None)
    return leaf.ndim >= 2 and name not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(decays, params)


def decoupled_weight_decay(schedule, rate: float,
                           mask) -> optax.GradientTransformation:
  """Adds ``-schedule(t) · rate · θ`` to the masked parameters' updates.

  AdamW's decoupled decay as a transform of its own, for a part of the
  parameters whose update some other transform already made (Muon's Adam
  part, whose own decay has no mask).
  """
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    step = schedule(state.count) * rate
    decays = mask(params) if callable(mask) else mask
    updates = jax.tree.map(lambda u, p, d: u - step * p if d else u,
                           updates, params, decays)
    return updates, optax.ScaleByScheduleState(
        count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def muon(schedule, adam_schedule, **hparams) -> optax.GradientTransformation:
  """``optax.contrib.muon`` with the demo's decay mask in both of its parts.

  Muon's convention: matrices (2-D) get Muon with ``schedule``, everything
  else (biases, norm scales, 3-D attention and 4-D conv kernels) Adam with
  ``adam_schedule``. Muon's own decay takes a mask; its Adam part's does not,
  so that decay is added after it (:func:`decoupled_weight_decay`).
  """
  hp = {**MUON_HPARAMS, **hparams}

  def adam_decays(params):
    return jax.tree.map(lambda d, p: bool(d) and np.ndim(p) != 2,
                        decay_mask(params), params)

  return optax.chain(
      optax.contrib.muon(
          schedule, beta=hp['beta'], weight_decay=hp['weight_decay'],
          weight_decay_mask=decay_mask, adam_b1=hp['adam_b1'],
          adam_b2=hp['adam_b2'], adam_weight_decay=0.0,
          adam_learning_rate=adam_schedule),
      decoupled_weight_decay(adam_schedule, hp['adam_weight_decay'],
                             adam_decays),
  )


_PRECONDITIONER_KEYS = ('damping', 'stat_decay', 't_cov', 't_inv',
                        'second_moments')


def make_optimizer(name: str, learning_rate: float, budget: Budget,
                   layers: mac_optax.Layers | None = None,
                   adam_learning_rate: float | None = None,
                   **overrides) -> optax.GradientTransformationExtraArgs:
  """The optimizer ``name`` with the demo's shared schedule and decay mask.

  Args:
    name: one of ``OPTIMIZERS`` but ``'kfac'`` (not an optax transform, see
      ``demo.kfac``): ``'mac'``; ``'mac_adamw'`` (:func:`mac_optax.mac_adamw`:
      MAC on the preconditioned layers, AdamW on the rest); ``'pre_muon'``,
      ``'pre_adamw'`` (:func:`mac_optax.preconditioned` in front of Muon or
      AdamW, with MAC's damping and statistics settings); ``'adamw'``;
      ``'sgd'`` (heavy-ball momentum with decoupled weight decay: MAC's chain
      without the preconditioner); ``'muon'`` (:func:`muon`).
    learning_rate: peak learning rate.
    budget: gives the schedule's length and warmup.
    layers: MAC's layers (only for the ``MAC_FAMILY``).
    adam_learning_rate: the peak Adam learning rate, for ``TWO_RATES`` only.
    **overrides: replace entries of ``MAC_HPARAMS`` (the MAC family),
      ``SGD_HPARAMS``, ``ADAMW_HPARAMS`` or ``MUON_HPARAMS``.

  Returns:
    The optimizer; ``update`` accepts (and all but the MAC family ignore)
    ``mac_stats``.
  """
  if name not in OPTIMIZERS or name == 'kfac':
    raise ValueError(f'unknown optimizer {name!r}; expected one of'
                     f' {OPTIMIZERS} but kfac.')
  if (name in TWO_RATES) != (adam_learning_rate is not None):
    raise ValueError(
        f'{name}: adam_learning_rate is needed for {TWO_RATES} and only'
        f' there, got {adam_learning_rate}.')
  if name in MAC_FAMILY and layers is None:
    raise ValueError(f'make_optimizer({name!r}) needs `layers`.')

  def schedule_of(peak):
    return optax.warmup_cosine_decay_schedule(0.0, peak, budget.warmup_steps,
                                              budget.steps)

  schedule = schedule_of(learning_rate)
  mac_hp = {**MAC_HPARAMS, **overrides}
  preconditioner = {k: v for k, v in mac_hp.items()
                    if k in _PRECONDITIONER_KEYS}
  if name == 'mac':
    return mac_optax.mac(schedule, layers=layers, weight_decay_mask=decay_mask,
                         **mac_hp)
  if name == 'mac_adamw':
    return mac_optax.mac_adamw(
        schedule, layers=layers,
        adam_learning_rate=schedule_of(adam_learning_rate),
        weight_decay_mask=decay_mask, adam_b1=ADAMW_HPARAMS['b1'],
        adam_b2=ADAMW_HPARAMS['b2'],
        adam_weight_decay=ADAMW_HPARAMS['weight_decay'], **mac_hp)
  if name == 'pre_muon':
    return mac_optax.preconditioned(
        muon(schedule, schedule_of(adam_learning_rate)), layers=layers,
        **preconditioner)
  if name == 'pre_adamw':
    return mac_optax.preconditioned(
        optax.adamw(schedule, mask=decay_mask, **ADAMW_HPARAMS),
        layers=layers, **preconditioner)
  if name == 'sgd':
    hp = {**SGD_HPARAMS, **overrides}
    return optax.chain(
        optax.trace(decay=hp['momentum']),
        optax.add_decayed_weights(hp['weight_decay'], decay_mask),
        optax.scale_by_learning_rate(schedule),
    )
  if name == 'adamw':
    return optax.adamw(schedule, mask=decay_mask,
                       **{**ADAMW_HPARAMS, **overrides})
  return muon(schedule, schedule_of(adam_learning_rate), **overrides)


def _weighted_ce(logits, batch):
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch['targets'])
  return losses, batch['weights']


def make_train_step(task: tasks_lib.Task, tx, use_stats: bool):
  """``step(params, state, opt_state, batch) -> (params, state, opt_state,
  loss)``, to be jitted.

  Args:
    task: gives the model.
    tx: the optimizer.
    use_stats: apply the model through :func:`mac_optax.capture` and pass the
      statistics to ``tx.update`` (MAC); otherwise plain ``model.apply``.

  Returns:
    The step function.
  """
  apply_fn = (mac_optax.capture(task.model.apply) if use_stats
              else task.model.apply)

  def loss_fn(params, state, batch):
    variables = {'params': params, **state}
    mutable = list(state)
    out = apply_fn(variables, batch['inputs'], train=True, mutable=mutable)
    if use_stats:
      (logits, new_state), stats = out
    else:
      (logits, new_state), stats = out, None
    losses, weights = _weighted_ce(logits, batch)
    loss = jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    return loss, (dict(new_state), stats)

  def step(params, state, opt_state, batch):
    (loss, (state, stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params, state, batch)
    extra = {'mac_stats': stats} if use_stats else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), state, opt_state, loss

  return step


def make_eval_step(task: tasks_lib.Task):
  """Jitted ``(params, state, batch) -> [Σ w·loss, Σ w·correct, Σ w]``."""
  def evaluate(params, state, batch):
    logits = task.model.apply({'params': params, **state}, batch['inputs'])
    losses, weights = _weighted_ce(logits, batch)
    correct = (jnp.argmax(logits, -1) == batch['targets']).astype(jnp.float32)
    return jnp.stack([jnp.sum(losses * weights), jnp.sum(correct * weights),
                      jnp.sum(weights)])
  return jax.jit(evaluate)


def evaluate(eval_step, params, state, batches) -> tuple[float, float]:
  """(loss, accuracy) over ``batches``, weighted."""
  sums = sum(np.asarray(eval_step(params, state, b), np.float64)
             for b in batches)
  return float(sums[0] / sums[2]), float(sums[1] / sums[2])


def init(task: tasks_lib.Task, seed: int):
  """``(params, other collections)`` of ``task.model``."""
  variables = task.model.init(jax.random.key(seed), task.example)
  variables = dict(variables)
  params = variables.pop('params')
  return params, variables


def first_layer_moments(task: tasks_lib.Task, params, state, layers,
                        batch_size: int):
  """Input second moment of the first preconditioned layer, one data pass.

  The reference's first-layer factor: the layer is then preconditioned with
  ``(Σ + λI)⁻¹`` instead of the rank-one form.
  """
  if task.epoch_inputs is None:
    raise ValueError(f'{task.name}: no pass over the data for a first-layer'
                     ' factor.')
  return mac_optax.input_second_moments(
      task.model.apply, {'params': params, **state},
      task.epoch_inputs(batch_size), layers=layers, progress=False)


def train(task: tasks_lib.Task, optimizer: str, learning_rate: float,
          budget: Budget, seed: int = 0, progress: bool = True,
          first_layer: bool = False, adam_learning_rate: float | None = None,
          **overrides) -> History:
  """Trains ``task.model`` with one optimizer and returns its history.

  Wall-clock (``History.seconds``) counts training steps, plus MAC's
  first-layer pass if any: the step is compiled before the clock starts and
  evaluations stop it.

  K-FAC, which cannot run every model, returns a :class:`History` whose
  ``error`` says why (and whose curves are empty) instead of raising.

  Args:
    task: what to train.
    optimizer: a name in ``OPTIMIZERS``.
    learning_rate: peak learning rate.
    budget: steps, batch size, schedule and evaluation points.
    seed: parameter init and data order (the same for every optimizer).
    progress: show a tqdm bar.
    first_layer: MAC family only: precondition the first layer with the
      exact damped inverse of its input second moment (the reference's
      ``_configure``), measured by one pass over the training inputs.
    adam_learning_rate: the peak Adam learning rate of ``TWO_RATES``.
    **overrides: optimizer hyperparameters, see :func:`make_optimizer` (and
      ``demo.kfac.KFAC_HPARAMS``).

  Returns:
    The :class:`History`.
  """
  if optimizer == 'kfac':
    try:
      return _train(task, optimizer, learning_rate, budget, seed, progress,
                    first_layer, adam_learning_rate, overrides)
    except Exception as error:  # pylint: disable=broad-except
      # K-FAC traces the model to find its layers and fails on some; the
      # tables show why rather than dropping the row.
      message = ' '.join(str(error).split())
      return History(task=task.name, optimizer=optimizer,
                     learning_rate=learning_rate, seed=seed,
                     metric=task.metric, eval_name=task.eval_name,
                     device=jax.devices()[0].device_kind,
                     error=f'{type(error).__name__}: {message}'[:300])
  return _train(task, optimizer, learning_rate, budget, seed, progress,
                first_layer, adam_learning_rate, overrides)


def _train(task, optimizer, learning_rate, budget, seed, progress,
           first_layer, adam_learning_rate, overrides) -> History:
  """:func:`train`, raising on any error."""
  params, state = init(task, seed)
  layers = None
  setup_seconds = 0.0
  if optimizer in MAC_FAMILY:
    layers = mac_optax.find_layers(task.model.apply,
                                   {'params': params, **state}, task.example)
    if first_layer:
      start = time.perf_counter()
      overrides['second_moments'] = jax.block_until_ready(first_layer_moments(
          task, params, state, layers, budget.batch_size))
      setup_seconds = time.perf_counter() - start
  batches = task.batches(np.random.default_rng(seed), budget.batch_size)
  batch = next(batches)
  start = time.perf_counter()
  if optimizer == 'kfac':
    from mac_optax.demo import kfac  # pylint: disable=g-import-not-at-top
    kfac_init, step = kfac.make_kfac_step(
        task, optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, budget.warmup_steps, budget.steps),
        decay_mask, seed, **overrides)
    opt_state = kfac_init(params, state, batch)
    # K-FAC compiles on its first calls (a step that refreshes the inverses
    # and one that does not): run two on copies, outside the clock, like the
    # other optimizers' compilation.
    warm = jax.tree.map(jnp.copy, (params, state, opt_state))
    for _ in range(2):
      warm = step(*warm, batch)[:3]
    jax.block_until_ready(warm)
  else:
    tx = make_optimizer(optimizer, learning_rate, budget, layers,
                        adam_learning_rate, **overrides)
    opt_state = tx.init(params)
    step = jax.jit(make_train_step(task, tx, optimizer in MAC_FAMILY),
                   donate_argnums=(0, 1, 2)).lower(
                       params, state, opt_state, batch).compile()
  eval_step = make_eval_step(task)
  history = History(
      task=task.name, optimizer=optimizer, learning_rate=learning_rate,
      adam_learning_rate=adam_learning_rate,
      seed=seed, metric=task.metric, eval_name=task.eval_name,
      compile_seconds=time.perf_counter() - start,
      setup_seconds=setup_seconds,
      params=models.count_params(params),
      device=jax.devices()[0].device_kind)

  def record(done, seconds, losses):
    loss, accuracy = evaluate(eval_step, params, state, task.eval_batches)
    history.steps.append(done)
    history.seconds.append(seconds)
    history.train_loss.append(
        float(np.mean(np.asarray(losses))) if losses else math.nan)
    history.eval_loss.append(loss)
    history.eval_accuracy.append(accuracy)

  seconds, done = setup_seconds, 0
  record(0, seconds, [])
  bar = tqdm(total=budget.steps, unit='step', disable=not progress,
             desc=_run_label(task, optimizer, learning_rate, seed,
                             adam_learning_rate),
             leave=True, dynamic_ncols=True)
  # Reading the loss waits for the device, so the bar's loss only refreshes
  # now and then.
  show_every = max(1, budget.eval_every // 5)

  def show(loss, elapsed):
    bar.set_postfix({
        'loss': f'{loss:.3f}',
        f'{task.eval_name} {task.metric}': f'{history.curve[-1]:.3f}',
        f'{task.units}/s': f'{done * budget.batch_size / elapsed:,.0f}',
    }, refresh=False)

  for target in budget.eval_steps()[1:]:
    losses = []
    start = time.perf_counter()
    while done < target:
      params, state, opt_state, loss = step(params, state, opt_state, batch)
      losses.append(loss)
      batch = next(batches)
      done += 1
      if progress and done % show_every == 0:
        show(float(loss), seconds + time.perf_counter() - start)
      bar.update(1)
    jax.block_until_ready(losses[-1])
    seconds += time.perf_counter() - start
    record(done, seconds, losses)
    show(history.train_loss[-1], seconds)
  bar.close()
  history.examples = done * budget.batch_size
  return history


def _run_label(task, optimizer, learning_rate, seed,
               adam_learning_rate=None) -> str:
  adam = ('' if adam_learning_rate is None
          else f' adam_lr={adam_learning_rate:g}')
  return (f'{task.name} {OPTIMIZER_LABELS[optimizer]} lr={learning_rate:g}'
          f'{adam} seed={seed}')


def _score(history: History) -> float:
  """The final eval metric, oriented so that lower is better (NaN: worst)."""
  value = history.final
  if not math.isfinite(value):
    return math.inf
  return -value if history.metric == 'accuracy' else value


def best_learning_rate(histories: Iterable[History]) -> History:
  """The run with the best final eval metric (a diverged run never wins)."""
  return min(histories, key=_score)


def sweep(task: tasks_lib.Task, grids: dict[str, Sequence[float]],
          budget: Budget, seed: int = 0, progress: bool = True,
          first_layer: bool = False,
          adam_grids: dict[str, Sequence[float]] | None = None,
          ) -> dict[str, list[History]]:
  """Trains every optimizer at every learning rate of its grid.

  Pass a task whose eval set is held out from the training set (see
  ``data.holdout_images`` / ``data.holdout_text``), never the test set.

  Args:
    task: what to train, evaluated on held-out data.
    grids: learning rates per optimizer.
    budget: the budget every run gets.
    seed: one seed for all runs.
    progress: tqdm bars.
    first_layer: MAC's first-layer factor, see :func:`train`.
    adam_grids: Adam learning rates of the ``TWO_RATES`` optimizers; each
      runs on the product of its two grids.

  Returns:
    ``{optimizer: [History per grid point]}``.
  """
  adam_grids = adam_grids or {}
  runs = {}
  for name, grid in grids.items():
    if name in TWO_RATES and not adam_grids.get(name):
      raise ValueError(f'{name} has two learning rates: give its Adam grid.')
    points = [(lr, adam) for lr in grid
              for adam in (adam_grids[name] if name in TWO_RATES else [None])]
    runs[name] = [train(task, name, lr, budget, seed, progress,
                        first_layer=first_layer, adam_learning_rate=adam)
                  for lr, adam in points]
  return runs
