"""Which layers MAC preconditions, and their geometry."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Iterator, Mapping
import warnings

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mac_optax import _boxes
from mac_optax import _geometry
from mac_optax import _capture
from mac_optax import _nnx
from mac_optax import _recording
from mac_optax import _rules
from mac_optax import _stats
from mac_optax import _tracking

Path = _geometry.Path
path_str = _geometry.path_str
LayerSpec = _geometry.LayerSpec
Layers = _geometry.Layers


def _check_against_params(path: Path, spec: LayerSpec, params: Any) -> None:
  node = _geometry.lookup(params, path)
  where = f'layer {path_str(path)} ({spec.module})'
  if not isinstance(node, Mapping) or 'kernel' not in node:
    raise ValueError(
        f'{where}: expected a "kernel" parameter at params/{path_str(path)},'
        ' found none.'
    )
  if spec.has_bias != ('bias' in node):
    raise ValueError(
        f'{where}: the layer {"uses" if spec.has_bias else "has no"} bias'
        f' but the params {"lack" if spec.has_bias else "have"} one.'
    )


def _kernel_axes(path: Path, call: _rules.LayerCall, stacked: int,
                 ndim: int) -> tuple[int, ...] | None:
  """The permutation from the stored kernel to canonical order, or None.

  ``call.kernel_axes`` lists positions after the ``stacked`` leading axes
  (which a rule cannot know about when ``nn.scan`` adds them); they come
  first, the unlisted axes follow in stored order.
  """
  if call.kernel_axes is None:
    return None
  rest = ndim - stacked
  listed = []
  for axis in call.kernel_axes:
    if not -rest <= axis < rest:
      raise ValueError(
          f'layer {path_str(path)} ({call.module}): its rule places kernel'
          f' axes at {call.kernel_axes}, but the kernel has {rest} axes after'
          f' its {stacked} stacked ones.'
      )
    listed.append(axis % rest)
  if len(set(listed)) != len(listed):
    raise ValueError(
        f'layer {path_str(path)} ({call.module}): its rule lists kernel axes'
        f' {call.kernel_axes} more than once.'
    )
  order = listed + [a for a in range(rest) if a not in listed]
  full = tuple(range(stacked)) + tuple(stacked + a for a in order)
  return None if full == tuple(range(ndim)) else full


def _spec_from_params(
    path: Path, call: _rules.LayerCall, stat_shape: tuple[int, ...],
    params: Any,
) -> LayerSpec:
  per_layer = (call.blocks, 0) if call.blocks > 1 else (0,)
  stack_shape = tuple(stat_shape[: len(stat_shape) - len(per_layer)])
  partial = LayerSpec(call.kind, call.module, call.in_shape, (), call.blocks,
                      call.has_bias, stack_shape)
  _check_against_params(path, partial, params)
  kernel_shape = tuple(np.shape(_boxes.unbox(_geometry.lookup(params, path)['kernel'])))
  kernel_axes = _kernel_axes(path, call, len(stack_shape), len(kernel_shape))
  if kernel_axes is not None:
    stored = kernel_shape
    kernel_shape = tuple(stored[a] for a in kernel_axes)
  prefix = stack_shape + call.in_shape
  if kernel_shape[: len(prefix)] != prefix:
    layout = ('' if kernel_axes is None else
              f' (stored {stored}, axes {kernel_axes} in canonical order)')
    raise ValueError(
        f'layer {path_str(path)} ({call.module}): kernel shape {kernel_shape}'
        f'{layout} does not start with the stacked/input axes {prefix} seen'
        ' in the forward pass.'
    )
  spec = dataclasses.replace(partial, out_shape=kernel_shape[len(prefix):],
                             kernel_axes=kernel_axes)
  out_size = int(np.prod(spec.out_shape, dtype=np.int64))
  if out_size % spec.blocks:
    raise ValueError(
        f'layer {path_str(path)}: {out_size} output features do not split'
        f' into {spec.blocks} blocks.'
    )
  if spec.has_bias:
    bias_shape = tuple(np.shape(_boxes.unbox(_geometry.lookup(params, path)['bias'])))
    if bias_shape != spec.bias_shape:
      raise ValueError(
          f'layer {path_str(path)}: bias shape {bias_shape}, expected'
          f' {spec.bias_shape}.'
      )
  return spec


def find_layers(apply_fn: Callable[..., Any], *args, params: Any = None,
                allow_empty: bool = False, **kwargs) -> Layers:
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
  recorder = _tracking.Recorder()
  nnx_models = [arg for arg in args if isinstance(arg, nnx.Module)]
  decorated = getattr(apply_fn, 'mac_optax_with_stats', None)
  if decorated is not None:
    stats, found_params = _trace_with_stats(decorated, recorder, args, kwargs)
    params = found_params if params is None else params
    if params is None:
      raise TypeError(
          'find_layers(loss_fn, *args, params=...): give the parameter tree of'
          ' the linen models the loss function calls.'
      )
  elif isinstance(apply_fn, _nnx.NNXCapture) or _nnx.is_nnx(apply_fn):
    capture_fn = apply_fn
    if not isinstance(capture_fn, _nnx.NNXCapture):
      capture_fn = _nnx.NNXCapture(apply_fn)
    graphdef, state = nnx.split(capture_fn.model)
    _, stats = _eval_shape(
        lambda s: capture_fn.bound_to(nnx.merge(graphdef, s)).run(
            recorder, *args, **kwargs),
        state, recorder=recorder,
    )
    params = nnx.state(capture_fn.model, nnx.Param)
    nnx_models = [capture_fn.model]
  else:
    if not isinstance(apply_fn, _capture.Capture):
      apply_fn = _capture.Capture(apply_fn)
    if not args:
      raise TypeError('find_layers(model.apply, variables, *inputs): the'
                      ' variables are missing.')
    variables = args[0]
    _, stats = _eval_shape(
        lambda: apply_fn.apply_with_recorder(recorder, *args, **kwargs),
        recorder=recorder,
    )
    # A wrapper may take the parameter tree itself first.
    params = (_capture.params_of(variables)
              if isinstance(variables, Mapping) else {})
  specs = {}
  for path, stat in (_stats.mean_inputs(stats) if stats else {}).items():
    specs[path] = _spec_from_params(
        path, recorder.layers[path], tuple(stat.shape), params
    )
  _check_found(specs, params, recorder, allow_empty, nnx_models)
  layers = Layers(specs, recorder.modules, recorder.unsupported,
                  recorder.value_sources, recorder.attention,
                  recorder.with_rule)
  layers.allow_empty = allow_empty
  return layers


def _unbound_axis_name(error: NameError) -> str | None:
  """The axis name of JAX's 'unbound axis name: <name>' error, or None."""
  found = re.search(r'unbound axis name:? ([^\s.]+)', str(error))
  return found.group(1) if found else None


def _eval_shape(fn: Callable[..., Any], *operands,
                recorder: _tracking.Recorder):
  """``jax.eval_shape(fn, *operands)``, binding unbound collective axes.

  A collective over an axis name that only ``pmap``/``shard_map`` would bind
  (``BatchNorm(axis_name='batch')``'s mean) raises ``NameError`` outside of
  them. Each such name is bound by an enclosing ``jax.vmap`` of size 1 and the
  trace rerun (``recorder`` emptied first); the leading axes that these add
  to the outputs are stripped again.
  """
  names: list[str] = []
  while True:
    traced = fn
    for name in names:
      traced = jax.vmap(traced, in_axes=None, axis_size=1, axis_name=name)
    try:
      outputs = jax.eval_shape(traced, *operands)
    except NameError as error:
      name = _unbound_axis_name(error)
      if name is None or name in names:
        raise
      names.append(name)
      for field in dataclasses.fields(recorder):
        setattr(recorder, field.name, field.default_factory())
      continue
    if not names:
      return outputs
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape[len(names):], leaf.dtype),
        outputs)


def _check_found(specs, params, recorder: _tracking.Recorder,
                 allow_empty: bool, nnx_models) -> None:
  """Raises when no layer was found but kernels exist; warns on ruleless ones.

  A module that owns a kernel and got no statistic is explained when its rule
  skipped it on purpose (decoding, ``PassThrough``) or gave a reason
  (``unsupported``, shown by :func:`summary`); else it has no rule, or was not
  called in the traced pass.
  """
  nnx_modules = {tuple(path): module for model in nnx_models
                 for path, module in nnx.iter_modules(model)}
  unexplained = [
      path for path in _geometry.kernel_owners(params)
      if path not in specs and path not in recorder.skipped
      and path not in recorder.unsupported]
  if not specs:
    if unexplained and not allow_empty:
      types = dict(recorder.modules)
      for path, module in nnx_modules.items():
        if _rules.rule_of(module) is None and path not in recorder.layers:
          types[path] = type(module).__name__
      raise _capture.no_statistics_error(
          'find_layers traced the model', unexplained, types)
    return

  def has_no_rule(path):
    if path in nnx_modules:
      module = nnx_modules[path]
      return (_rules.rule_of(module) is None
              and _rules.attention_rule_of(module) is None)
    return path in recorder.modules and path not in recorder.attention

  ruleless = [path for path in unexplained if has_no_rule(path)]
  if ruleless:
    warnings.warn(
        'find_layers: these modules own a kernel but MAC has no rule for'
        ' their class, so they train without preconditioning: '
        + _capture.describe_modules(ruleless, {
            path: (type(nnx_modules[path]).__name__ if path in nnx_modules
                   else recorder.modules.get(path, '?'))
            for path in ruleless})
        + '. Teach MAC their classes with mac_optax.register_layer.',
        stacklevel=3)


def _trace_with_stats(loss_fn, recorder, args, kwargs):
  """Runs a ``with_stats`` loss function under ``jax.eval_shape``.

  NNX models among ``args`` travel as their state (split, merged inside);
  everything else is closed over, so no FLOPs are spent.

  Returns:
    The statistics' shapes and the NNX models' ``Param`` state (or None).
  """
  splits = {i: nnx.split(arg) for i, arg in enumerate(args)
            if isinstance(arg, nnx.Module)}

  def run(states):
    full = list(args)
    for i, (graphdef, _) in splits.items():
      full[i] = nnx.merge(graphdef, states[i])
    _, aux = loss_fn.run(recorder, *full, **kwargs)
    return aux[1] if loss_fn.has_aux else aux

  stats = _eval_shape(run, {i: state for i, (_, state) in splits.items()},
                      recorder=recorder)
  params = None
  if splits:
    models = [args[i] for i in splits]
    params = (nnx.state(models[0], nnx.Param) if len(models) == 1 else
              nnx.merge_state(*(nnx.state(m, nnx.Param) for m in models)))
  return stats, params


# Children that make a module look like attention: separate query/key/value
# projections, or one fused projection.
_ATTENTION_CHILDREN = (
    ('query', 'key', 'value'), ('q_proj', 'k_proj', 'v_proj'),
    ('q', 'k', 'v'), ('wq', 'wk', 'wv'), ('qkv',), ('c_attn',),
)


def _not_preconditioned(layers: Layers, module_path: Path,
                        owns_kernel: bool) -> str:
  """Why the parameters of ``module_path`` are not preconditioned."""
  owner = _geometry.owner(layers, module_path)
  if owner in layers.unsupported or not owns_kernel:
    return layers.unsupported.get(owner, layers.modules.get(owner, '?'))
  module = layers.modules.get(module_path)
  if module is None:
    return ('a kernel whose module was not called in the traced forward'
            ' pass')
  if module_path in layers.with_rule:
    return f'{module}, not called in the traced forward pass'
  return f'unknown layer with a kernel: {module}'


def _attention_hints(layers: Layers, kernel_owners: set[Path]) -> list[str]:
  """Modules that look like attention but were not called as attention."""
  children: dict[Path, set] = {}
  for path in kernel_owners:
    if path:
      children.setdefault(path[:-1], set()).add(path[-1])
  hints = []
  for parent, names in sorted(children.items(), key=lambda i: str(i[0])):
    if not any(set(group) <= names for group in _ATTENTION_CHILDREN):
      continue
    if any(parent[:end] in layers.attention for end in range(len(parent) + 1)):
      continue
    module = layers.modules.get(parent, '?')
    hints.append(
        f'{path_str(parent)} ({module}) looks like attention; register it'
        ' with register_attention to get the attention-aware value'
        ' statistic')
  return hints


def summary(layers: Layers, params: Any) -> str:
  """A table of every parameter and whether (and how) MAC preconditions it.

  Parameters that are not preconditioned say why: the module passes through
  (with its reason), or it owns a kernel but MAC has no rule for its class
  (``unknown layer with a kernel: <class>``; teach MAC with
  :func:`register_layer`). Then come modules that look like attention (children
  named ``query``/``key``/``value``, ``q_proj``/``k_proj``/``v_proj``,
  ``q``/``k``/``v``, ``wq``/``wk``/``wv``, ``qkv`` or ``c_attn``, with
  kernels) but were not called under an attention rule, so that their value
  projection has the plain statistic (declare them with
  :func:`register_attention`), and the totals: preconditioned kernels, and the
  share of all parameters (kernels and biases) that MAC preconditions.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, mac_optax
    >>> model = nn.Sequential([nn.Dense(8), nn.LayerNorm(), nn.Dense(2)])
    >>> x = jnp.ones((4, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> layers = mac_optax.find_layers(model.apply, variables, x)
    >>> print(mac_optax.summary(layers, variables['params']))
    parameter        shape   MAC
    layers_0/bias    (8,)    preconditioned: dense (Dense), d=4
    layers_0/kernel  (3, 8)  preconditioned: dense (Dense), d=4
    layers_1/bias    (8,)    not preconditioned: LayerNorm
    layers_1/scale   (8,)    not preconditioned: LayerNorm
    layers_2/bias    (2,)    preconditioned: dense (Dense), d=9
    layers_2/kernel  (8, 2)  preconditioned: dense (Dense), d=9
    preconditioned kernels: 2 of 2; parameters covered: 50 of 66 (75.8 %)
  """
  leaves = [(path, leaf) for path, leaf in _geometry.leaf_paths(params)
            if not isinstance(leaf, optax.MaskedNode)]
  kernel_owners = set(_geometry.kernel_owners(params))
  rows = [('parameter', 'shape', 'MAC')]
  kernels = covered_kernels = size = covered_size = 0
  for path, leaf in leaves:
    module_path, name = path[:-1], path[-1]
    spec = layers.get(module_path)
    preconditioned = spec is not None and name in ('kernel', 'bias')
    if preconditioned:
      blocks = f' x{spec.blocks} blocks' if spec.blocks > 1 else ''
      status = f'preconditioned: {spec.kind} ({spec.module}), d={spec.dim}'
      status += blocks
      if module_path in layers.value_sources:
        status += f'; {layers.value_sources[module_path]}'
    else:
      reason = _not_preconditioned(layers, module_path,
                                   module_path in kernel_owners)
      status = f'not preconditioned: {reason}'
    rows.append((path_str(path), str(tuple(np.shape(leaf))), status))
    kernels += name == 'kernel'
    covered_kernels += preconditioned and name == 'kernel'
    size += int(np.size(leaf))
    covered_size += int(np.size(leaf)) if preconditioned else 0
  widths = [max(len(r[i]) for r in rows) for i in range(2)]
  lines = [f'{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}'.rstrip()
           for r in rows]
  lines += _attention_hints(layers, kernel_owners)
  share = 100.0 * covered_size / size if size else 0.0
  lines.append(
      f'preconditioned kernels: {covered_kernels} of {kernels}; parameters'
      f' covered: {covered_size} of {size} ({share:.1f} %)')
  return '\n'.join(lines)
