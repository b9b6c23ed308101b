"""Layer geometry: which layers MAC preconditions and the shape of each.

A leaf of the package: the optimizer (``scale_by_mac``, ``mac``, accumulation,
sharding) reads layers through this module alone, and the Flax capture code
that finds them builds its results from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mac_optax import _boxes

Path = tuple[Any, ...]


def path_str(path: Path) -> str:
  return '/'.join(map(str, path)) if path else '<root>'


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static geometry of one preconditioned layer.

  In canonical order the kernel has shape ``stack_shape + in_shape +
  out_shape``: ``in_shape`` are the axes contracted with the layer input
  (flattened, they index the statistic), ``out_shape`` the output features.
  ``stack_shape`` holds leading axes with separate weights per index: layers
  stacked by ``nn.scan``, the batch dims of ``DenseGeneral``, the positions of
  ``ConvLocal``. The flattened output features split into ``blocks``
  contiguous blocks (convolution groups, attention heads, fused
  query/key/value), each with its own statistic. A kernel stored in another
  axis order (an einsum ``'BTD,NDH->BTNH'``, a transposed dense kernel) has
  ``kernel_axes``, the permutation that takes it as stored to canonical order.

  Attributes:
    kind: ``'dense'``, ``'einsum'``, ``'conv'``, ``'conv_transpose'``,
      ``'conv_local'``, ``'attention_value'`` or ``'attention_qkv'``.
    module: the module's class name.
    in_shape: kernel axes contracted with the input.
    out_shape: kernel output axes.
    blocks: number of output blocks with their own statistic.
    has_bias: whether a bias is preconditioned jointly, as the last coordinate.
      The bias has shape ``stack_shape + out_shape``.
    stack_shape: leading stacked-layer axes.
    kernel_axes: ``transpose(kernel, kernel_axes)`` puts the kernel as stored
      in canonical order; None when it is stored so.
  """

  kind: str
  module: str
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  blocks: int
  has_bias: bool
  stack_shape: tuple[int, ...] = ()
  kernel_axes: tuple[int, ...] | None = None

  @property
  def dim(self) -> int:
    """Length ``d`` of the statistic: input size, plus one with a bias."""
    return int(np.prod(self.in_shape, dtype=np.int64)) + int(self.has_bias)

  @property
  def stat_shape(self) -> tuple[int, ...]:
    per_layer = (self.blocks, self.dim) if self.blocks > 1 else (self.dim,)
    return self.stack_shape + per_layer

  @property
  def canonical_kernel_shape(self) -> tuple[int, ...]:
    """``stack_shape + in_shape + out_shape``."""
    return self.stack_shape + self.in_shape + self.out_shape

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    """The kernel's shape as stored in the parameters."""
    canonical = self.canonical_kernel_shape
    if self.kernel_axes is None:
      return canonical
    stored = [0] * len(canonical)
    for position, axis in enumerate(self.kernel_axes):
      stored[axis] = canonical[position]
    return tuple(stored)

  def to_canonical(self, kernel):
    """The kernel (or its gradient) as stored -> canonical axis order."""
    if self.kernel_axes is None:
      return kernel
    return jnp.transpose(kernel, self.kernel_axes)

  def from_canonical(self, kernel):
    """Inverse of :meth:`to_canonical`: canonical -> as stored."""
    if self.kernel_axes is None:
      return kernel
    inverse = tuple(int(a) for a in np.argsort(self.kernel_axes))
    return jnp.transpose(kernel, inverse)

  @property
  def bias_shape(self) -> tuple[int, ...]:
    return self.stack_shape + self.out_shape


class Layers(Mapping[Path, LayerSpec]):
  """The preconditioned layers of a model, keyed by module path.

  Made by :func:`find_layers`. Besides the mapping of module path to
  :class:`LayerSpec`, it remembers the type of every module it saw
  (``modules``), the layers it saw but cannot precondition, with the reason
  (``unsupported``), and the modules called under an attention rule
  (``attention``), for :func:`summary`.

  ``allow_empty`` says that finding no layer is accepted (``find_layers(...,
  allow_empty=True)``); ``handled_elsewhere`` holds layers taken out with
  :meth:`without`, whose statistics the optimizer then ignores.
  """

  allow_empty: bool = False
  handled_elsewhere: frozenset = frozenset()

  def __init__(
      self,
      specs: Mapping[Path, LayerSpec],
      modules: Mapping[Path, str] | None = None,
      unsupported: Mapping[Path, str] | None = None,
      value_sources: Mapping[Path, str] | None = None,
      attention: Iterable[Path] = (),
      with_rule: Iterable[Path] = (),
  ):
    self._specs = dict(specs)
    self.modules = dict(modules or {})
    self.unsupported = dict(unsupported or {})
    self.value_sources = dict(value_sources or {})
    self.attention = frozenset(attention)
    self.with_rule = frozenset(with_rule)

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

  def without(self, paths: Iterable[Path]) -> Layers:
    """These layers minus ``paths``, which another transform preconditions.

    The modules stay known (so ``init`` does not take their kernels for
    another model's), and ``scale_by_mac`` ignores their statistics.
    """
    paths = frozenset(paths)
    rest = Layers({p: s for p, s in self._specs.items() if p not in paths},
                  self.modules, self.unsupported, self.value_sources,
                  self.attention, self.with_rule)
    # Nothing runs unpreconditioned because of the split.
    rest.allow_empty = self.allow_empty or bool(paths & set(self._specs))
    rest.handled_elsewhere = self.handled_elsewhere | paths
    return rest


def active_layers(layers: Layers, params: Any) -> dict[Path, LayerSpec]:
  """Layers whose kernel is present (not masked out) in ``params``.

  Raises when a layer's kernel or bias is missing, misshapen, or masked apart
  from its bias.
  """
  active = {}
  for path, spec in layers.items():
    node = lookup(params, path)
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


def nest_per_layer(flat: Mapping[Path, Any]) -> Any:
  """{module path: value} -> nested dicts keyed like the params.

  A layer at the root (a model that is one ``Dense``) gives the value itself.
  """
  if () in flat:
    if len(flat) > 1:
      raise ValueError(_nesting_conflict((), next(p for p in flat if p)))
    return flat[()]
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for depth, key in enumerate(path[:-1]):
      node = node.setdefault(key, {})
      if not isinstance(node, dict):
        raise ValueError(_nesting_conflict(path[:depth + 1], path))
    if path[-1] in node:
      raise ValueError(_nesting_conflict(path, path + ('...',)))
    node[path[-1]] = value
  return tree


def _nesting_conflict(outer: Path, inner: Path) -> str:
  return (
      f'MAC keeps per-layer state in dicts keyed by module path, and layer'
      f' {path_str(outer)} owns a kernel while a module inside it'
      f' ({path_str(inner)}) is preconditioned too. Precondition one of them'
      ' only (optax.masked / optax.partition), or give the inner kernel to a'
      ' module that is not inside a preconditioned layer.')


class PerLayerFields:
  """Stands for a per-layer field of a state when the params are unknown.

  ``optax.tree.map_params`` calls ``init`` with a placeholder instead of the
  params, to find the parameter-shaped parts of the state. Which layers have
  state depends on the params (``optax.masked``/``partition`` leave some out),
  so each per-layer field is one opaque leaf there, standing for the whole
  field of the real state.
  """

  def __repr__(self) -> str:
    return '<per-layer MAC statistics>'


def layer_gradients(updates: Any, paths: Iterable[Path], layers: Layers
                    ) -> dict[Path, tuple[jax.Array, jax.Array | None]]:
  """``{path: (kernel, bias)}`` of the layers' gradients, boxes unwrapped."""
  gradients = {}
  for path in paths:
    spec = layers[path]
    node = lookup(updates, path)
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
    gradients[path] = (kernel, bias if spec.has_bias else None)
  return gradients


def replace_layer_gradients(updates: Any, new: Mapping[Path, tuple]) -> Any:
  """``updates`` with the kernels and biases of ``new`` put in, boxes kept."""
  leaves = {}
  for path, (kernel, bias) in new.items():
    leaves[path + ('kernel',)] = kernel
    if bias is not None:
      leaves[path + ('bias',)] = bias

  def replace(keys, leaf):
    path = tuple(key_name(k) for k in keys)
    # A boxed update keeps its box: sharding names survive the step.
    return _boxes.rebox(leaf, leaves[path]) if path in leaves else leaf

  return jax.tree_util.tree_map_with_path(replace, updates,
                                          is_leaf=_boxes.is_leaf_box)


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


def leaf_paths(tree: Any) -> list[tuple[Path, Any]]:
  """``(path, leaf)`` for every leaf of a nested-mapping tree.

  A box (see :func:`is_leaf_box`) is one leaf, given as the array inside it,
  at the path of the parameter (``Dense_0/kernel``, not ``.../value``).
  """
  return [
      (tuple(key_name(k) for k in keys), _boxes.unbox(leaf))
      for keys, leaf in jax.tree_util.tree_flatten_with_path(
          tree, is_leaf=_boxes.is_leaf_box
      )[0]
  ]


def kernel_owners(params: Any) -> list[Path]:
  """Module paths that own a ``kernel`` in a params tree.

  Boxed kernels count; kernels masked out (``optax.MaskedNode``) do not.
  """
  return [path[:-1] for path, leaf in leaf_paths(params)
          if path and path[-1] == 'kernel'
          and not isinstance(leaf, optax.MaskedNode)]


def owner(layers: Layers, path: Path) -> Path:
  """The deepest recorded module path that is a prefix of a parameter path."""
  for end in range(len(path), -1, -1):
    if path[:end] in layers.modules:
      return path[:end]
  return ()


def precondition_mask(layers: Layers, params: Any) -> Any:
  """A bool tree like ``params``: True where MAC preconditions the leaf.

  Useful as an ``optax.partition``/``optax.masked`` label source, and to check
  what :func:`find_layers` found. A boxed parameter (``nn.Partitioned``,
  ``nn.LogicallyPartitioned``, an NNX ``Variable``) gets one bool in place of
  its box, which ``optax.masked`` accepts as a prefix of the boxed tree.
  """
  def is_preconditioned(keys, _):
    path = tuple(key_name(k) for k in keys)
    return path[:-1] in layers and path[-1] in ('kernel', 'bias')

  return jax.tree_util.tree_map_with_path(
      is_preconditioned, params, is_leaf=_boxes.is_leaf_box
  )
