"""Captures in several Python threads at once each get their own statistics.

A barrier inside a module's ``__call__`` makes the threads meet halfway
through their forward passes, so that every capture is active while another
one runs. Each thread's statistics must equal the float64 means of its own
model's layer inputs, and nothing may stay patched afterwards.
"""

import threading

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mac_optax

RTOL, ATOL = 2e-5, 2e-6
TIMEOUT_S = 120


class _Wait(nn.Module):
  barrier: threading.Barrier
  rounds: int = 1

  def __call__(self, x):
    if not self.is_initializing():
      for _ in range(self.rounds):
        self.barrier.wait(TIMEOUT_S)
    return x


class _LinenModel(nn.Module):
  barrier: threading.Barrier
  hidden: int
  rounds: int = 1

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden, name='a')(x)
    h = _Wait(self.barrier, self.rounds)(jnp.tanh(h))
    return nn.Dense(2, name='b')(h)


class _NNXModel(nnx.Module):

  def __init__(self, barrier, rngs):
    self.barrier = barrier
    self.a = nnx.Linear(3, 6, rngs=rngs)
    self.b = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.a(x))
    self.barrier.wait(TIMEOUT_S)
    return self.b(h)


def _with_one(x):
  x = np.asarray(x, np.float64)
  return np.concatenate([x.reshape(-1, x.shape[-1]).mean(axis=0), [1.0]])


def _oracle(kernel, bias, x):
  """Means of what ``a`` and ``b`` multiply: x, and tanh(x @ a + bias)."""
  x = np.asarray(x, np.float64)
  h = np.tanh(x @ np.asarray(kernel, np.float64) + np.asarray(bias))
  return {'a': _with_one(x), 'b': _with_one(h)}


def _run_threads(jobs):
  results, errors = {}, []

  def run(name, job):
    try:
      results[name] = job()
    except BaseException as error:  # pylint: disable=broad-except
      errors.append((name, error))

  threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(TIMEOUT_S)
  assert not errors, errors
  assert set(results) == set(jobs)
  return results


def _check(stats, oracle):
  assert set(stats) == set(oracle)
  for name, mean in oracle.items():
    np.testing.assert_allclose(stats[name]['mean_input'], mean, RTOL, ATOL)


def _linen_job(barrier, hidden, seed, through_wrapper):
  model = _LinenModel(barrier, hidden)
  x = jax.random.normal(jax.random.key(seed), (4 + seed, 3))
  variables = model.init(jax.random.key(seed), x)

  def forward(variables, x):
    return model.apply(variables, x)

  def job():
    function = forward if through_wrapper else model.apply
    _, stats = mac_optax.capture(function)(variables, x)
    params = variables['params']['a']
    return stats, _oracle(params['kernel'], params['bias'], x)

  return job


def _nnx_job(barrier, seed):
  model = _NNXModel(barrier, nnx.Rngs(seed))
  x = jax.random.normal(jax.random.key(seed), (5, 3))

  def job():
    _, stats = mac_optax.capture(model)(x)
    return stats, _oracle(model.a.kernel.get_value(),
                          model.a.bias.get_value(), x)

  return job


def _assert_nothing_patched():
  assert nn.Module.apply is mac_optax._capture.module_apply.ORIGINAL_APPLY  # pylint: disable=protected-access
  for cls in (nnx.Linear, nnx.Conv, nnx.MultiHeadAttention):
    assert not hasattr(vars(cls).get('__call__'), 'mac_optax_original'), cls


def test_two_linen_captures_in_two_threads():
  barrier = threading.Barrier(2)
  jobs = {
      'direct': _linen_job(barrier, 5, 1, through_wrapper=False),
      'wrapper': _linen_job(barrier, 7, 2, through_wrapper=True),
  }
  results = _run_threads(jobs)
  for stats, oracle in results.values():
    _check(stats, oracle)
  _assert_nothing_patched()


def test_linen_and_nnx_captures_in_two_threads():
  barrier = threading.Barrier(3)
  jobs = {
      'linen': _linen_job(barrier, 4, 3, through_wrapper=True),
      'nnx': _nnx_job(barrier, 4),
      'nnx_too': _nnx_job(barrier, 5),
  }
  results = _run_threads(jobs)
  for stats, oracle in results.values():
    _check(stats, oracle)
  _assert_nothing_patched()


def test_a_thread_that_does_not_capture_runs_the_plain_models():
  """Calls in other threads meanwhile see the original apply and __call__."""
  barrier = threading.Barrier(2)
  captured = _LinenModel(barrier, 3, rounds=2)
  x = jax.random.normal(jax.random.key(0), (2, 3))
  captured_variables = captured.init(jax.random.key(0), x)
  plain_linen = _LinenModel(threading.Barrier(1), 3)
  plain_variables = plain_linen.init(jax.random.key(1), x)
  plain_nnx = _NNXModel(threading.Barrier(1), nnx.Rngs(0))
  expected = (plain_linen.apply(plain_variables, x), plain_nnx(x))

  def plain():
    barrier.wait(TIMEOUT_S)  # the other thread is mid-capture from here...
    outputs = (plain_linen.apply(plain_variables, x), plain_nnx(x))
    # model.apply looked up now is the dispatcher: capture still works.
    apply = plain_linen.apply
    assert apply.__func__ is not mac_optax._capture.module_apply.ORIGINAL_APPLY  # pylint: disable=protected-access
    stats = mac_optax.capture(apply)(plain_variables, x)[1]
    barrier.wait(TIMEOUT_S)  # ... to here
    return outputs, stats

  def capturing():
    return mac_optax.capture(captured.apply)(captured_variables, x)[1]

  results = _run_threads({'plain': plain, 'capturing': capturing})
  outputs, stats = results['plain']
  for got, want in zip(outputs, expected):
    np.testing.assert_allclose(got, want, RTOL, ATOL)
  params = captured_variables['params']['a']
  _check(results['capturing'], _oracle(params['kernel'], params['bias'], x))
  params = plain_variables['params']['a']
  _check(stats, _oracle(params['kernel'], params['bias'], x))
  _assert_nothing_patched()
