"""Which layers MAC preconditions: their geometry, and the summary table.

:func:`layers_from` turns what a traced pass saw into :class:`Layers`, each
layer's :class:`LayerCall` completed from the parameters; :func:`summary`
tells for every parameter whether (and how) MAC preconditions it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping
import warnings

from flax import nnx
import numpy as np
import optax

from mac_optax import _boxes
from mac_optax import _geometry
from mac_optax import _stats
from mac_optax._capture import common
from mac_optax._capture import rules
from mac_optax._capture import tracking

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


def _kernel_axes(path: Path, call: rules.LayerCall, stacked: int,
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
    path: Path, call: rules.LayerCall, stat_shape: tuple[int, ...],
    params: Any,
) -> LayerSpec:
  """The layer's :class:`LayerSpec`: the call's geometry, completed.

  Axes of the statistic before its ``([blocks,] d)`` are stacked ones (added
  by ``nn.scan``, unknown to the rule); the kernel axes after the stacked and
  input ones are the output features.
  """
  per_layer = (call.blocks, 0) if call.blocks > 1 else (0,)
  stack_shape = tuple(stat_shape[: len(stat_shape) - len(per_layer)])
  partial = LayerSpec(kind=call.kind, module=call.module,
                      in_shape=call.in_shape, out_shape=(), blocks=call.blocks,
                      has_bias=call.has_bias, stack_shape=stack_shape)
  _check_against_params(path, partial, params)
  node = _geometry.lookup(params, path)
  kernel_shape = tuple(np.shape(_boxes.unbox(node['kernel'])))
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
    bias_shape = tuple(np.shape(_boxes.unbox(node['bias'])))
    if bias_shape != spec.bias_shape:
      raise ValueError(
          f'layer {path_str(path)}: bias shape {bias_shape}, expected'
          f' {spec.bias_shape}.'
      )
  return spec


def layers_from(survey: tracking.Survey, stats: Any, params: Any,
                allow_empty: bool, nnx_models) -> Layers:
  """The :class:`Layers` of a traced pass, checked against ``params``.

  Args:
    survey: what the pass saw.
    stats: the shapes of the statistics it made.
    params: the parameter tree the optimizer will see.
    allow_empty: accept no layer where the parameters have kernels.
    nnx_models: the NNX models the pass ran (they name the modules that no
      call reached).
  """
  specs = {}
  for path, stat in (_stats.mean_inputs(stats) if stats else {}).items():
    specs[path] = _spec_from_params(
        path, survey.layers[path], tuple(stat.shape), params
    )
  _check_found(specs, params, survey, allow_empty, nnx_models)
  layers = Layers(specs, survey.modules, survey.unsupported,
                  survey.value_sources, survey.attention, survey.with_rule)
  layers.allow_empty = allow_empty
  return layers


def _check_found(specs, params, survey: tracking.Survey,
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
      if path not in specs and path not in survey.skipped
      and path not in survey.unsupported]
  if not specs:
    if unexplained and not allow_empty:
      types = dict(survey.modules)
      for path, module in nnx_modules.items():
        if rules.rule_of(module) is None and path not in survey.layers:
          types[path] = type(module).__name__
      raise common.no_statistics_error(
          'find_layers traced the model', unexplained, types)
    return

  def has_no_rule(path):
    if path in nnx_modules:
      module = nnx_modules[path]
      return (rules.rule_of(module) is None
              and rules.attention_rule_of(module) is None)
    return path in survey.modules and path not in survey.attention

  ruleless = [path for path in unexplained if has_no_rule(path)]
  if ruleless:
    warnings.warn(
        'find_layers: these modules own a kernel but MAC has no rule for'
        ' their class, so they train without preconditioning: '
        + common.describe_modules(ruleless, {
            path: (type(nnx_modules[path]).__name__ if path in nnx_modules
                   else survey.modules.get(path, '?'))
            for path in ruleless})
        + '. Teach MAC their classes with mac_optax.register_layer.',
        stacklevel=4)


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
