"""MAC under meshes with Explicit axes, for test_explicit_sharding.py.

The test starts this file in a subprocess whose environment forces 8 CPU
devices (the flag must be set before jax starts):

  python explicit_sharding_worker.py OUT.npz

Small linen and NNX models train a few MAC steps on a 4 x 2 mesh with
Explicit axes ('fsdp', 'tp'), the way FSDP + tensor-parallel trainers such as
Gemma's shard them: parameters stored sharded over both axes (gathered for
the forward pass, so gradients come back sharded like the parameters) and
activations resharded between layers over the batch ('batch'), the features
('features') or both ('both'). Every case also runs unsharded, without any
mesh. Results go to OUT.npz as '<case>:<leaf path>' arrays, or
'<case>:error' with the message when a case fails, so that the other cases
still run. Importing this module touches no devices (it registers two
attention classes with MAC).
"""

from __future__ import annotations

import functools
import sys
import traceback
from typing import Any

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import gemma_like
import mac_optax

STEPS = 3
# Micro-batches of multi_steps (BATCH / 2) still split over 'fsdp'.
BATCH, LENGTH, WIDTH, HEADS, HEAD_DIM, KV_HEADS, HIDDEN = 8, 6, 8, 4, 2, 2, 16
VOCAB, OUTPUTS = 16, 3
HYPER = dict(damping=0.5, stat_decay=0.9, t_cov=1, t_inv=1)
LEARNING_RATE = 0.1
# Activation layouts of (batch, length, features) arrays.
LAYOUTS = {
    'batch': P('fsdp', None, None),
    'features': P(None, None, 'tp'),
    'both': P('fsdp', None, 'tp'),
    # Batch-sharded, with tensor-parallel compute: parameters are gathered
    # over 'fsdp' only, so attention heads and MLP features stay on 'tp'.
    'tensor': P('fsdp', None, None),
}


MESH_SHAPE = {'fsdp': 4, 'tp': 2}


def make_mesh():
  return jax.make_mesh(
      tuple(MESH_SHAPE.values()), tuple(MESH_SHAPE),
      axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def _constrain(x, layout):
  """Activations resharded to ``layout`` (Gemma reshards between layers)."""
  if layout is None:
    return x
  return jax.sharding.reshard(x, layout)


def _batch_only(x, layout):
  """Convolutions take inputs sharded over the batch only (JAX cannot infer
  a convolution's output sharding from feature-sharded inputs)."""
  if layout is None:
    return x
  return jax.sharding.reshard(x, P(layout[0]))


def storage_spec(path: tuple[str, ...], shape) -> P:
  """FSDP + tensor-parallel storage: every kernel on both mesh axes.

  Input axes over 'fsdp', output (or head) axes over 'tp', as far as the
  sizes divide.
  """
  names = [str(p) for p in path if p != 'value']  # NNX Variables
  if names[-1] in ('kernel', 'embedding'):
    if len(shape) == 2:
      axes = ('fsdp', 'tp')
    elif len(shape) == 4:
      axes = (None, 'tp', 'fsdp', None)  # (q/k/v, heads, features, head_dim)
    elif names[-2] in ('out', 'unmix', 'attn_vec_einsum'):
      axes = ('tp', None, 'fsdp')  # (heads, head_dim, features)
    elif 'conv' in names[-2]:
      axes = (None, 'fsdp', 'tp')  # (width, in, out)
    elif shape[0] == WIDTH:
      axes = ('fsdp', 'tp', None)  # (features, heads, head_dim)
    else:
      axes = ('tp', 'fsdp', None)  # (heads, features, head_dim)
  else:
    axes = ('tp',) + (None,) * (len(shape) - 1)
  axes = tuple(a if a is not None and shape[i] % MESH_SHAPE[a] == 0 else None
               for i, a in enumerate(axes))
  return P(*axes)


def _key_names(keys):
  return tuple(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))
               for k in keys)


def param_specs(params):
  return jax.tree_util.tree_map_with_path(
      lambda keys, leaf: storage_spec(_key_names(keys), np.shape(leaf)),
      params)


def _gathered_model(model, sharded: bool, keep_tp: bool = False):
  """An NNX model whose parameters are gathered for the forward pass."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, _gathered(params, sharded, keep_tp), rest)


def _gathered(params, sharded: bool, keep_tp: bool = False):
  """What the forward pass uses: FSDP gathers the parameters.

  Over both axes (replicated), or over 'fsdp' only with ``keep_tp``.
  """
  if not sharded:
    return params

  def gather(p):
    spec = P()
    if keep_tp:
      spec = P(*(a if a == 'tp' else None for a in jax.typeof(p).sharding.spec))
    return jax.sharding.reshard(p, spec)
  return jax.tree.map(gather, params)


# --------------------------------------------------------------------------
# Models.


class LinenToy(nn.Module):
  """Dense with and without bias, two Einsums, attention, a 1-D conv."""

  layout: Any = None

  @nn.compact
  def __call__(self, x):
    c = lambda h: _constrain(h, self.layout)
    x = c(x)
    h = c(nn.gelu(nn.Dense(HIDDEN, name='up')(x)))
    x = c(x + nn.Dense(WIDTH, use_bias=False, name='down')(h))
    e = nn.Einsum((WIDTH, HEADS, HEAD_DIM), 'btd,dnh->btnh', name='mix')(x)
    e = nn.Einsum((HEADS, HEAD_DIM, WIDTH), 'btnh,nhd->btd', use_bias=False,
                  name='unmix')(nn.gelu(e))
    x = c(x + e)
    x = c(x + nn.MultiHeadDotProductAttention(num_heads=HEADS,
                                              name='attn')(x))
    x = c(x + nn.Conv(WIDTH, (3,), name='conv')(_batch_only(x, self.layout)))
    return nn.Dense(OUTPUTS, name='head')(jnp.mean(x, axis=1))


class NnxToy(nnx.Module):
  """The NNX twin of LinenToy."""

  def __init__(self, rngs: nnx.Rngs, layout=None):
    self.layout = layout
    self.up = nnx.Linear(WIDTH, HIDDEN, rngs=rngs)
    self.down = nnx.Linear(HIDDEN, WIDTH, use_bias=False, rngs=rngs)
    self.mix = nnx.Einsum('btd,dnh->btnh', (WIDTH, HEADS, HEAD_DIM),
                          (HEADS, HEAD_DIM), rngs=rngs)
    self.unmix = nnx.Einsum('btnh,nhd->btd', (HEADS, HEAD_DIM, WIDTH),
                            rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=rngs)
    self.conv = nnx.Conv(WIDTH, WIDTH, (3,), rngs=rngs)
    self.head = nnx.Linear(WIDTH, OUTPUTS, rngs=rngs)

  def __call__(self, x):
    c = lambda h: _constrain(h, self.layout)
    x = c(x)
    h = c(nnx.gelu(self.up(x)))
    x = c(x + self.down(h))
    x = c(x + self.unmix(nnx.gelu(self.mix(x))))
    x = c(x + self.attn(x))
    x = c(x + self.conv(_batch_only(x, self.layout)))
    return self.head(jnp.mean(x, axis=1))


class GemmaAttention(nnx.Module):
  """Gemma-style attention: head-shaped Einsum projections, GQA, causal."""

  def __init__(self, rngs: nnx.Rngs):
    self.q_einsum = nnx.Einsum('BTD,DNH->BTNH', (WIDTH, HEADS, HEAD_DIM),
                               rngs=rngs)
    self.k_einsum = nnx.Einsum('BSD,DKH->BSKH', (WIDTH, KV_HEADS, HEAD_DIM),
                               rngs=rngs)
    self.v_einsum = nnx.Einsum('BSD,DKH->BSKH', (WIDTH, KV_HEADS, HEAD_DIM),
                               rngs=rngs)
    self.attn_vec_einsum = nnx.Einsum(
        'BTNH,NHD->BTD', (HEADS, HEAD_DIM, WIDTH), rngs=rngs)

  def __call__(self, x, out_sharding=None):
    q, k, v = self.q_einsum(x), self.k_einsum(x), self.v_einsum(x)
    # Key/value head k serves query heads k * repeat ... (k + 1) * repeat - 1,
    # which stay on its devices when the heads are sharded.
    repeat = HEADS // KV_HEADS
    k, v = (jnp.repeat(t, repeat, axis=2, out_sharding=(
        None if out_sharding is None else jax.typeof(t).sharding))
            for t in (k, v))
    logits = jnp.einsum('BTNH,BSNH->BNTS', q, k) / np.sqrt(HEAD_DIM)
    causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    probabilities = jax.nn.softmax(logits, axis=-1)
    return self.attn_vec_einsum(
        jnp.einsum('BNTS,BSNH->BTNH', probabilities, v),
        out_sharding=out_sharding)


mac_optax.register_attention(
    GemmaAttention, query='q_einsum', key='k_einsum', value='v_einsum',
    num_heads=HEADS, causal=True)


class GemmaToy(nnx.Module):
  """Embedding, an RMS-normed attention block and a ReLU MLP, tied logits.

  With ``tensor_parallel``, the head-contracting projection says where its
  output goes (its contracted heads are sharded).
  """

  def __init__(self, rngs: nnx.Rngs, layout=None, tensor_parallel=False):
    self.layout = layout
    self.out_sharding = layout if tensor_parallel else None
    self.embedder = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.pre_attention_norm = nnx.RMSNorm(WIDTH, rngs=rngs)
    self.attn = GemmaAttention(rngs)
    self.pre_ffw_norm = nnx.RMSNorm(WIDTH, rngs=rngs)
    self.up = nnx.Linear(WIDTH, HIDDEN, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(HIDDEN, WIDTH, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    c = lambda h: _constrain(h, self.layout)
    # The ids are gathered for the lookup (JAX cannot infer the sharding of a
    # lookup with batch-sharded ids).
    x = c(self.embedder(_constrain(tokens, P() if self.layout else None)))
    x = c(x + self.attn(c(self.pre_attention_norm(x)), self.out_sharding))
    h = c(nnx.relu(self.up(c(self.pre_ffw_norm(x)))))
    x = c(x + self.down(h))
    return self.embedder.attend(x)


class ShardedGemmaLike(gemma_like.GemmaLike):
  """tests/gemma_like.py's model, its activations resharded between blocks.

  ``fused_qkv=True``: a ``'BTD,SNDH->SBTNH'`` query/key/value einsum;
  ``False``: ``'BTD,NDH->BTNH'`` queries and grouped ``'BSD,CKDH->CBSKH'``
  keys/values. Rotary embeddings, soft-capping, a sliding-window layer.
  """

  def __init__(self, rngs: nnx.Rngs, layout=None, fused_qkv=True):
    super().__init__(
        vocab=VOCAB, features=WIDTH, num_heads=HEADS,
        num_kv_heads=HEADS if fused_qkv else KV_HEADS, head_dim=HEAD_DIM,
        hidden=HIDDEN, num_layers=2, fused_qkv=fused_qkv, rngs=rngs)
    self.layout = layout

  def __call__(self, tokens):
    c = lambda h: _constrain(h, self.layout)
    ids = _constrain(tokens, P() if self.layout else None)
    x = c(self.embedder(ids) * jnp.sqrt(self.embedder.features))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    attn_mask = gemma_like.causal_mask(ids)
    for block in self.blocks:
      x = c(block(x, positions, attn_mask))
    return self.embedder.attend(self.final_norm(x))


# --------------------------------------------------------------------------
# Training.


def _data(kind: str, seed: int = 0):
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(STEPS):
    if kind == 'tokens':
      x = rng.integers(0, VOCAB, size=(BATCH, LENGTH)).astype(np.int32)
      y = rng.integers(0, VOCAB, size=(BATCH, LENGTH)).astype(np.int32)
    else:
      x = (rng.normal(size=(BATCH, LENGTH, WIDTH)) + 0.3).astype(np.float32)
      y = rng.normal(size=(BATCH, OUTPUTS)).astype(np.float32)
    batches.append((x, y))
  return batches


def _loss(outputs, y):
  if jnp.issubdtype(y.dtype, jnp.integer):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, y).mean()
  return jnp.mean(jnp.square(outputs - y))


def _put(mesh, spec, value):
  return jax.device_put(value, NamedSharding(mesh, spec))


def _flat(tree, prefix):
  flat = {}
  for keys, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = '/'.join(str(k) for k in _key_names(keys))
    flat[f'{prefix}/{name}'] = np.asarray(leaf)
  return flat


def _moment():
  """A fixed symmetric positive definite (WIDTH + 1)^2 second moment."""
  rows = np.random.default_rng(1).normal(size=(32, WIDTH + 1))
  return (rows.T @ rows / 32).astype(np.float32)


def _describe(layers):
  """'path kind blocks' per preconditioned layer, one string per line."""
  return np.asarray('\n'.join(sorted(
      f'{"/".join(map(str, path))} {spec.kind} {spec.blocks}'
      for path, spec in layers.items())))


def _batch_spec(x, layout):
  """Inputs arrive batch-sharded when the layout shards the batch."""
  return P(layout[0], *([None] * (np.ndim(x) - 1)))


def linen_run(layout_name=None, *, accumulate=False):
  """LinenToy with mac(): params and state shardings from state_sharding."""
  layout = LAYOUTS.get(layout_name)
  mesh = make_mesh() if layout is not None else None
  model = LinenToy(layout)
  data = _data('float')
  params = LinenToy().init(jax.random.key(0), data[0][0])['params']
  results = _flat(params, 'initial')

  def run():
    nonlocal params
    sharded = mesh is not None
    specs = param_specs(params)
    x0 = data[0][0]
    if sharded:
      params = jax.tree.map(lambda p, s: _put(mesh, s, p), params, specs)
      x0 = _put(mesh, _batch_spec(x0, layout), x0)
    layers = mac_optax.find_layers(
        model.apply, {'params': _gathered(params, sharded)}, x0)
    results['layers'] = _describe(layers)
    apply_with_stats = mac_optax.capture(model.apply)
    # 'up' takes the exact first-layer factor of a fixed second moment.
    tx = mac_optax.mac(LEARNING_RATE, layers=layers,
                       second_moments={'up': {'second_moment': _moment()}},
                       **HYPER)
    # multi_steps takes each batch as two halves.
    micro = [(x[half], y[half]) for x, y in data
             for half in (slice(0, BATCH // 2), slice(BATCH // 2, None))]
    if accumulate:
      example = jax.eval_shape(
          apply_with_stats, {'params': _gathered(params, sharded)},
          micro[0][0])[1]
      tx = mac_optax.multi_steps(tx, 2, example_stats=example)

    def step(params, state, x, y):
      def loss_fn(params):
        outputs, stats = apply_with_stats(
            {'params': _gathered(params, sharded)}, x)
        return _loss(outputs, y), stats
      (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, state = tx.update(grads, state, params, mac_stats=stats)
      return optax.apply_updates(params, updates), state, stats

    if sharded:
      param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
      state_shardings = mac_optax.state_sharding(tx, params, param_shardings)
      init = jax.jit(tx.init, out_shardings=state_shardings)
      step = jax.jit(step, out_shardings=(param_shardings, state_shardings,
                                          None))
    else:
      init, step = jax.jit(tx.init), jax.jit(step)
    state = init(params)
    for i, (x, y) in enumerate(micro if accumulate else data):
      if sharded:
        x, y = (_put(mesh, _batch_spec(x, layout), x),
                _put(mesh, _batch_spec(y, layout), y))
      params, state, stats = step(params, state, x, y)
      if i == 0:
        results.update(_flat(stats, 'stats'))
    # [0] is the first-layer factor of 'up', [1] MAC's rank-one layers.
    mac_state = state.inner_opt_state[1] if accumulate else state[1]
    results.update(_flat(params, 'params'))
    results.update(_flat(mac_state.mean_input, 'mean_input'))
    if sharded:
      # The state as jit laid it out equals what state_sharding asked for.
      same = jax.tree.map(
          lambda leaf, want: leaf.sharding.is_equivalent_to(want, leaf.ndim),
          state, state_shardings)
      results['state_sharding_matches'] = np.asarray(
          all(jax.tree.leaves(same)))
      momentum = (state_shardings.inner_opt_state[2] if accumulate
                  else state_shardings[2]).trace
      results['momentum_spec/up/kernel'] = np.asarray(
          str(momentum['up']['kernel'].spec))

  if mesh is None:
    run()
  else:
    with jax.set_mesh(mesh):
      run()
  return results


class ShardMapToy(nn.Module):
  """Dense with and without bias and an Einsum, for shard_map_run."""

  layout: Any = None

  @nn.compact
  def __call__(self, x):
    c = lambda h: _constrain(h, self.layout)
    h = c(nn.gelu(nn.Dense(HIDDEN, name='up')(c(x))))
    x = c(x + nn.Dense(WIDTH, use_bias=False, name='down')(h))
    e = nn.Einsum((WIDTH, HEADS, HEAD_DIM), 'btd,dnh->btnh', name='mix')(x)
    return nn.Dense(OUTPUTS, name='head')(jnp.mean(e, axis=(1, 2)))


def shard_map_run(layout_name=None):
  """shard_map over 'fsdp' (MAC's axis_name) with 'tp' left Explicit.

  Inside, the activations are sharded over the features on 'tp' and the
  parameters are stored sharded over 'tp'.
  """
  # Inside shard_map the batch axis is manual: only the features are resharded.
  layout = None if layout_name is None else P(None, None, 'tp')
  mesh = make_mesh() if layout is not None else None
  data = _data('float')
  model = ShardMapToy(layout)
  params = ShardMapToy().init(jax.random.key(0), data[0][0])['params']
  results = _flat(params, 'initial')
  apply_with_stats = mac_optax.capture(model.apply)
  tx = None

  def step(params, state, x, y):
    def loss_fn(params):
      outputs, stats = apply_with_stats({'params': params}, x)
      # The global mean: shard_map sums the replicated parameters' gradients.
      return jnp.sum(jnp.square(outputs - y)) / (BATCH * OUTPUTS), stats
    grads, stats = jax.grad(loss_fn, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, mac_stats=stats)
    return optax.apply_updates(params, updates), state

  def run(params):
    nonlocal tx
    layers = mac_optax.find_layers(model.apply, {'params': params},
                                   data[0][0])
    results['layers'] = _describe(layers)
    tx = mac_optax.mac(LEARNING_RATE, layers=layers,
                       axis_name=None if mesh is None else 'fsdp', **HYPER)
    state = tx.init(params)
    if mesh is None:
      train = jax.jit(step)
    else:
      specs = jax.tree.map(
          lambda spec: P(*(None if a == 'fsdp' else a for a in spec)),
          param_specs(params))
      params = jax.tree.map(lambda p, s: _put(mesh, s, p), params, specs)
      # Each shard captures its own statistics; axis_name merges them inside
      # the update, so the state's statistics are compared.
      train = jax.jit(jax.shard_map(
          step, in_specs=(P(), P(), P('fsdp'), P('fsdp')),
          out_specs=(P(), P()), axis_names={'fsdp'}))
    for x, y in data:
      if mesh is not None:
        x, y = _put(mesh, P('fsdp'), x), _put(mesh, P('fsdp'), y)
      params, state = train(params, state, x, y)
    results.update(_flat(params, 'params'))
    results.update(_flat(state[0].mean_input, 'mean_input'))

  if mesh is None:
    run(params)
  else:
    with jax.set_mesh(mesh):
      run(params)
  return results


def nnx_run(model_class, layout_name=None, *, use_scale_by_mac=False,
            tokens=False, accumulate=False):
  """An NNX model with nnx.Optimizer under nnx.jit.

  With ``accumulate``, ``multi_steps`` over two half batches per step, its
  state made by nnx.Optimizer (not laid out by state_sharding).
  """
  layout = LAYOUTS.get(layout_name)
  mesh = make_mesh() if layout is not None else None
  data = _data('tokens' if tokens else 'float')
  if accumulate:
    data = [(x[half], y[half]) for x, y in data
            for half in (slice(0, BATCH // 2), slice(BATCH // 2, None))]
  results = {}

  def run():
    sharded = mesh is not None
    model = model_class(nnx.Rngs(0), layout)
    results.update(_flat(nnx.state(model, nnx.Param), 'initial'))
    x0 = data[0][0]
    if sharded:
      params = nnx.state(model, nnx.Param)
      specs = param_specs(params)
      nnx.update(model, jax.tree.map(lambda p, s: _put(mesh, s, p),
                                     params, specs))
      x0 = _put(mesh, _batch_spec(x0, layout), x0)
    keep_tp = layout_name == 'tensor'
    layers = mac_optax.find_layers(
        _gathered_model(model, sharded, keep_tp), x0)
    results['layers'] = _describe(layers)
    if use_scale_by_mac:
      tx = optax.chain(mac_optax.scale_by_mac(layers, **HYPER),
                       optax.sgd(LEARNING_RATE, momentum=0.9))
    else:
      tx = mac_optax.mac(LEARNING_RATE, layers=layers, **HYPER)
    if accumulate:
      example = nnx.jit(lambda model, x: mac_optax.capture(
          _gathered_model(model, sharded, keep_tp))(x)[1])(model, x0)
      tx = mac_optax.multi_steps(tx, 2, example_stats=example)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
      def loss_fn(model):
        outputs, stats = mac_optax.capture(
            _gathered_model(model, sharded, keep_tp))(x)
        return _loss(outputs, y), stats
      (_, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
      optimizer.update(model, grads, mac_stats=stats)
      return stats

    for i, (x, y) in enumerate(data):
      if sharded:
        x, y = (_put(mesh, _batch_spec(x, layout), x),
                _put(mesh, _batch_spec(y, layout), y))
      stats = step(model, optimizer, x, y)
      if i == 0:
        results.update(_flat(stats, 'stats'))
    results.update(_flat(nnx.state(model, nnx.Param), 'params'))
    mac_state = (optimizer.opt_state.inner_opt_state if accumulate
                 else optimizer.opt_state)[0]
    results.update(_flat(mac_state.mean_input, 'mean_input'))
    if sharded:
      kernel = nnx.state(model, nnx.Param)
      results['kernel_specs'] = np.asarray(str(sorted(
          (k, str(v.sharding.spec)) for k, v in _flat_arrays(kernel).items())))

  if mesh is None:
    run()
  else:
    with jax.set_mesh(mesh):
      run()
  return results


def _flat_arrays(tree):
  return {'/'.join(str(k) for k in _key_names(keys)): leaf
          for keys, leaf in jax.tree_util.tree_leaves_with_path(tree)}


CASES = {
    'linen': lambda layout: linen_run(layout),
    'linen_multi_steps': lambda layout: linen_run(layout, accumulate=True),
    'nnx': lambda layout: nnx_run(NnxToy, layout, use_scale_by_mac=True),
    'gemma': lambda layout: nnx_run(
        functools.partial(GemmaToy, tensor_parallel=layout == 'tensor'),
        layout, tokens=True),
    'gemma_fused_qkv': lambda layout: nnx_run(
        ShardedGemmaLike, layout, tokens=True),
    'gemma_heads_first': lambda layout: nnx_run(
        lambda rngs, layout: ShardedGemmaLike(rngs, layout, fused_qkv=False),
        layout, tokens=True),
    'nnx_multi_steps': lambda layout: nnx_run(NnxToy, layout,
                                              accumulate=True),
    'linen_shard_map': shard_map_run,
}
# (case, layouts): every case runs unsharded (None) and under these layouts.
PLAN = (
    ('linen', ('batch', 'features', 'both')),
    ('nnx', ('batch', 'features', 'both')),
    ('gemma', ('batch', 'features', 'both', 'tensor')),
    ('gemma_fused_qkv', ('both',)),
    ('gemma_heads_first', ('both',)),
    ('linen_multi_steps', ('both',)),
    ('nnx_multi_steps', ('both',)),
    ('linen_shard_map', ('features',)),
)


def main(out_path, only=None):
  arrays = {}
  for case, layouts in PLAN:
    if only and case not in only:
      continue
    for layout in (None,) + layouts:
      name = f'{case}.{layout or "unsharded"}'
      try:
        result = CASES[case](layout)
      except Exception as error:  # pylint: disable=broad-exception-caught
        traceback.print_exc()
        result = {'error': np.asarray(f'{type(error).__name__}: {error}')}
      for key, value in result.items():
        arrays[f'{name}:{key}'] = value
  np.savez(out_path, **arrays)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])
