"""Which layers MAC preconditions, and their geometry."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

from flax import nnx
import jax
import numpy as np
import optax

from mac_optax import _capture
from mac_optax import _nnx
from mac_optax import _recording
from mac_optax import _rules
from mac_optax import _stats
from mac_optax import _tracking

Path = _stats.Path
path_str = _stats.path_str


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static geometry of one preconditioned layer.

  The kernel has shape ``stack_shape + in_shape + out_shape``: ``in_shape`` are
  the axes contracted with the layer input (flattened, they index the
  statistic), ``out_shape`` the output features. ``stack_shape`` holds leading
  axes with separate weights per index: layers stacked by ``nn.scan``, the
  batch dims of ``DenseGeneral``, the positions of ``ConvLocal``. The flattened
  output features split into ``blocks`` contiguous blocks (convolution groups,
  attention heads, fused query/key/value), each with its own statistic.

  Attributes:
    kind: ``'dense'``, ``'einsum'``, ``'conv'``, ``'conv_transpose'``,
      ``'conv_local'``, ``'attention_value'`` or ``'attention_qkv'``.
    module: the module's class name.
    in_shape: kernel axes contracted with the input.
    out_shape: kernel output axes.
    blocks: number of output blocks with their own statistic.
    has_bias: whether a bias is preconditioned jointly, as the last coordinate.
    stack_shape: leading stacked-layer axes.
  """

  kind: str
  module: str
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  blocks: int
  has_bias: bool
  stack_shape: tuple[int, ...] = ()

  @property
  def dim(self) -> int:
    """Length ``d`` of the statistic: input size, plus one with a bias."""
    return int(np.prod(self.in_shape, dtype=np.int64)) + int(self.has_bias)

  @property
  def stat_shape(self) -> tuple[int, ...]:
    per_layer = (self.blocks, self.dim) if self.blocks > 1 else (self.dim,)
    return self.stack_shape + per_layer

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    return self.stack_shape + self.in_shape + self.out_shape

  @property
  def bias_shape(self) -> tuple[int, ...]:
    return self.stack_shape + self.out_shape


class Layers(Mapping[Path, LayerSpec]):
  """The preconditioned layers of a model, keyed by module path.

  Made by :func:`find_layers`. Besides the mapping of module path to
  :class:`LayerSpec`, it remembers the type of every module it saw
  (``modules``) and the layers it saw but cannot precondition, with the reason
  (``unsupported``), for :func:`summary`.
  """

  def __init__(
      self,
      specs: Mapping[Path, LayerSpec],
      modules: Mapping[Path, str] | None = None,
      unsupported: Mapping[Path, str] | None = None,
      value_sources: Mapping[Path, str] | None = None,
  ):
    self._specs = dict(specs)
    self.modules = dict(modules or {})
    self.unsupported = dict(unsupported or {})
    self.value_sources = dict(value_sources or {})

  def __getitem__(self, path: Path) -> LayerSpec:
    return self._specs[path]

  def __iter__(self) -> Iterator[Path]:
    return iter(self._specs)

  def __len__(self) -> int:
    return len(self._specs)

  def __repr__(self) -> str:
    return f'Layers({self.known()})'

  def known(self) -> str:
    """The layer paths, for error messages."""
    return ', '.join(path_str(p) for p in self._specs) or 'none'

  def require(self, path: Path, what: str) -> LayerSpec:
    """The spec at ``path``; raises naming ``what`` was given for it."""
    if path not in self._specs:
      raise ValueError(
          f'{what} for {path_str(path)}, which is not a preconditioned layer'
          f' of `layers` (known: {self.known()}).')
    return self._specs[path]


def check_exact_factor(spec: LayerSpec, where: str) -> None:
  """Raises unless ``spec`` can take a full ``d x d`` input factor."""
  if spec.kind not in ('dense', 'conv') or spec.blocks > 1 or spec.stack_shape:
    raise ValueError(
        f'{where}: the exact second-moment factor supports ungrouped'
        ' Dense/DenseGeneral/Conv layers outside nn.scan; this one is'
        f' {spec.kind} with {spec.blocks} block(s) and stacked axes'
        f' {spec.stack_shape}.'
    )


def lookup(tree: Any, path: Path) -> Any:
  """``tree[path[0]][path[1]]...`` or None when a key is missing."""
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return node


def key_name(entry) -> Any:
  """The key of one ``jax.tree_util`` path entry (dict key, index, attribute)."""
  for attribute in ('key', 'idx', 'name'):
    if hasattr(entry, attribute):
      return getattr(entry, attribute)
  return None


def is_variable(node: Any) -> bool:
  """Whether ``node`` is a Flax NNX ``Variable`` (a leaf here, not a node)."""
  return isinstance(node, nnx.Variable)


def unwrap(leaf: Any) -> Any:
  """The array inside an NNX ``Variable``, or ``leaf`` itself."""
  return leaf.get_value() if is_variable(leaf) else leaf


def leaf_paths(tree: Any) -> list[tuple[Path, Any]]:
  """``(path, leaf)`` for every leaf of a nested-mapping tree."""
  return [
      (tuple(key_name(k) for k in keys), leaf)
      for keys, leaf in jax.tree_util.tree_flatten_with_path(
          tree, is_leaf=is_variable
      )[0]
  ]


def flatten_stats(stats: Any) -> dict[Path, Any]:
  """Maps module path -> ``mean_input`` for a ``mac_stats`` tree."""
  return _stats.mean_inputs(stats)


def _check_against_params(path: Path, spec: LayerSpec, params: Any) -> None:
  node = lookup(params, path)
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


def _spec_from_params(
    path: Path, call: _rules.LayerCall, stat_shape: tuple[int, ...],
    params: Any,
) -> LayerSpec:
  per_layer = (call.blocks, 0) if call.blocks > 1 else (0,)
  stack_shape = tuple(stat_shape[: len(stat_shape) - len(per_layer)])
  partial = LayerSpec(call.kind, call.module, call.in_shape, (), call.blocks,
                      call.has_bias, stack_shape)
  _check_against_params(path, partial, params)
  kernel_shape = tuple(np.shape(lookup(params, path)['kernel']))
  prefix = stack_shape + call.in_shape
  if kernel_shape[: len(prefix)] != prefix:
    raise ValueError(
        f'layer {path_str(path)} ({call.module}): kernel shape {kernel_shape}'
        f' does not start with the stacked/input axes {prefix} seen in the'
        ' forward pass.'
    )
  spec = dataclasses.replace(partial, out_shape=kernel_shape[len(prefix):])
  out_size = int(np.prod(spec.out_shape, dtype=np.int64))
  if out_size % spec.blocks:
    raise ValueError(
        f'layer {path_str(path)}: {out_size} output features do not split'
        f' into {spec.blocks} blocks.'
    )
  if spec.has_bias:
    bias_shape = tuple(np.shape(lookup(params, path)['bias']))
    if bias_shape != spec.bias_shape:
      raise ValueError(
          f'layer {path_str(path)}: bias shape {bias_shape}, expected'
          f' {spec.bias_shape}.'
      )
  return spec


def find_layers(apply_fn: Callable[..., Any], *args, params: Any = None,
                **kwargs) -> Layers:
  """Finds the layers MAC preconditions by tracing one forward pass.

  The forward pass runs under ``jax.eval_shape``, so it costs no FLOPs. Pass
  the same arguments as in training (including ``mutable=['batch_stats']``,
  ``rngs=`` or a ``train`` flag): layers that a different call would skip are
  not found.

  Linen: ``find_layers(model.apply, variables, *args, **kwargs)``. NNX:
  ``find_layers(model, *args, **kwargs)``; the model is not changed. A loss
  function decorated with :func:`with_stats` (for models called inside code
  you do not own): ``find_layers(loss_fn, *args, params=params, **kwargs)``,
  where ``params`` is the parameter tree the optimizer will see (NNX models
  among ``args`` provide their own).

  Args:
    apply_fn: ``model.apply`` (linen), the model (NNX), or the
      :func:`capture` wrapper used for training when it was built with
      non-default options.
    *args: the arguments of the call: for linen the variables
      (``{'params': ..., ...}``) and then the inputs.
    params: with a :func:`with_stats` function, the parameters of its linen
      models.
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
    _, stats = jax.eval_shape(
        lambda s: capture_fn.bound_to(nnx.merge(graphdef, s)).run(
            recorder, *args, **kwargs),
        state,
    )
    params = nnx.state(capture_fn.model, nnx.Param)
  else:
    if not isinstance(apply_fn, _capture.Capture):
      apply_fn = _capture.Capture(apply_fn)
    if not args:
      raise TypeError('find_layers(model.apply, variables, *inputs): the'
                      ' variables are missing.')
    variables = args[0]
    _, stats = jax.eval_shape(
        lambda: apply_fn.apply_with_recorder(recorder, *args, **kwargs)
    )
    params = (variables.get('params', {})
              if isinstance(variables, Mapping) else {})
  specs = {}
  for path, stat in (flatten_stats(stats) if stats else {}).items():
    specs[path] = _spec_from_params(
        path, recorder.layers[path], tuple(stat.shape), params
    )
  return Layers(specs, recorder.modules, recorder.unsupported,
                recorder.value_sources)


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

  stats = jax.eval_shape(run, {i: state for i, (_, state) in splits.items()})
  params = None
  if splits:
    models = [args[i] for i in splits]
    params = (nnx.state(models[0], nnx.Param) if len(models) == 1 else
              nnx.merge_state(*(nnx.state(m, nnx.Param) for m in models)))
  return stats, params


def _owner(layers: Layers, path: Path) -> Path:
  """The deepest recorded module path that is a prefix of a parameter path."""
  for end in range(len(path), -1, -1):
    if path[:end] in layers.modules:
      return path[:end]
  return ()


def precondition_mask(layers: Layers, params: Any) -> Any:
  """A bool tree like ``params``: True where MAC preconditions the leaf.

  Useful as an ``optax.partition``/``optax.masked`` label source, and to check
  what :func:`find_layers` found.
  """
  def is_preconditioned(keys, _):
    path = tuple(key_name(k) for k in keys)
    return path[:-1] in layers and path[-1] in ('kernel', 'bias')

  return jax.tree_util.tree_map_with_path(
      is_preconditioned, params, is_leaf=is_variable
  )


def summary(layers: Layers, params: Any) -> str:
  """A table of every parameter and whether (and how) MAC preconditions it.

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
  """
  rows = [('parameter', 'shape', 'MAC')]
  for path, leaf in leaf_paths(params):
    if isinstance(leaf, optax.MaskedNode):
      continue
    module_path, name = path[:-1], path[-1]
    spec = layers.get(module_path)
    if spec is not None and name in ('kernel', 'bias'):
      blocks = f' x{spec.blocks} blocks' if spec.blocks > 1 else ''
      status = f'preconditioned: {spec.kind} ({spec.module}), d={spec.dim}'
      status += blocks
      if module_path in layers.value_sources:
        status += f'; {layers.value_sources[module_path]}'
    else:
      owner = _owner(layers, module_path)
      reason = layers.unsupported.get(owner, layers.modules.get(owner, '?'))
      status = f'not preconditioned: {reason}'
    rows.append((path_str(path), str(tuple(np.shape(leaf))), status))
  widths = [max(len(r[i]) for r in rows) for i in range(2)]
  return '\n'.join(
      f'{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}'.rstrip()
      for r in rows
  )
