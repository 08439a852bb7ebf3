"""Speech-translation decoder: masking, decoding against brute force, and a training smoke test."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mslam_jax import special_ids
from mslam_jax.downstream import decoder as decoder_lib

PAD, EOS = special_ids.PAD_ID, special_ids.EOS_ID
ENCODER_DIM = 24
# One tiny vocabulary for every test: PAD, EOS and 4 tokens. Small enough that
# the brute-force test can enumerate all 1 + 4 + 16 + 64 outputs of length <= 3.
VOCAB = 6


def tiny_decoder(max_length=16, deterministic=True):
  config = decoder_lib.DecoderConfig(num_layers=2, d_model=32, num_heads=4, ffn_dim=64,
                                     dropout_rate=0.1, vocab_size=VOCAB,
                                     max_length=max_length)
  return decoder_lib.TransformerDecoder(config, ENCODER_DIM, deterministic)


def random_inputs(seed, batch=2, length=8, frames=10):
  rng = np.random.default_rng(seed)
  targets_in = rng.integers(EOS + 1, VOCAB, size=(batch, length)).astype(np.int32)
  targets_in[:, 0] = PAD
  memory = rng.normal(size=(batch, frames, ENCODER_DIM)).astype(np.float32)
  paddings = np.zeros((batch, frames), np.float32)
  paddings[1, frames * 2 // 3:] = 1.0
  return targets_in, memory, paddings


@functools.lru_cache(maxsize=None)
def _jitted_init():
  return jax.jit(tiny_decoder().init)


def init(seed=0, unbox=True):
  """Decoder variables from random init; their shapes do not depend on B, L or T.

  Compiled once for fixed dummy inputs and reused by every test. The 'rbg' key
  is only for test speed: threefry's init compiles ~3x slower on CPU.
  """
  dummy = (np.zeros((1, 2), np.int32), np.zeros((1, 3, ENCODER_DIM), np.float32),
           np.zeros((1, 3), np.float32))
  variables = _jitted_init()(jax.random.key(seed, impl='rbg'), *dummy)
  return nn.meta.unbox(variables) if unbox else variables


def test_config_validation():
  with pytest.raises(ValueError, match='not divisible'):
    decoder_lib.DecoderConfig(d_model=30, num_heads=4)
  defaults = decoder_lib.DecoderConfig()
  assert (defaults.num_layers, defaults.d_model, defaults.num_heads) == (6, 512, 8)


def test_params_carry_logical_axes():
  boxed = init(unbox=False)['params']
  assert boxed['embed']['embedding'].names == ('vocab', 'embed')
  assert boxed['logits']['kernel'].names == ('embed', 'vocab')
  assert boxed['block_0']['ffn']['wi']['kernel'].names == ('embed', 'mlp')
  assert boxed['block_1']['cross_attention']['query']['kernel'].names == ('embed', 'heads', 'kv')


def test_causal_logits_ignore_later_tokens():
  model = tiny_decoder()
  targets_in, memory, paddings = random_inputs(1)
  params = init()
  apply = jax.jit(model.apply)
  logits = apply(params, targets_in, memory, paddings)
  assert logits.shape == (2, 8, VOCAB)
  for t in (0, 3, 6):
    changed = targets_in.copy()
    changed[:, t + 1:] = (changed[:, t + 1:] - 1) % (VOCAB - 2) + 2  # another token
    other = apply(params, changed, memory, paddings)
    np.testing.assert_allclose(other[:, :t + 1], logits[:, :t + 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(other[:, t + 1:], logits[:, t + 1:])


def test_padded_memory_frames_are_ignored():
  model = tiny_decoder()
  targets_in, memory, paddings = random_inputs(2)
  paddings[0, :] = 1.0  # an example with no valid frame must not read padding either
  params = init(seed=1)
  apply = jax.jit(model.apply)
  logits = apply(params, targets_in, memory, paddings)
  garbage = memory + 1e3 * np.random.default_rng(3).normal(size=memory.shape) * paddings[..., None]
  np.testing.assert_allclose(apply(params, targets_in, garbage.astype(np.float32), paddings),
                             logits, rtol=1e-5, atol=1e-5)
  # Padding is as if the frames were not there: example 1 alone, truncated to
  # its 6 valid frames, gives the same logits (zeroing alone would not do this).
  alone = apply(params, targets_in[1:], memory[1:, :6], paddings[1:, :6])
  np.testing.assert_allclose(alone[0], logits[1], rtol=1e-5, atol=1e-5)
  # A valid frame does matter (the mask is not dropping everything).
  valid_changed = memory.copy()
  valid_changed[1, 0] += 1.0
  assert not np.allclose(apply(params, targets_in, valid_changed, paddings)[1], logits[1])


def test_cached_steps_equal_teacher_forced_logits():
  model = tiny_decoder()
  targets_in, memory, paddings = random_inputs(6, length=7)
  params = init(seed=6)
  want = jax.jit(model.apply)(params, targets_in, memory, paddings)

  @jax.jit
  def stepwise(params, targets_in, memory, paddings):
    cache = decoder_lib.init_cache(model, params, memory, paddings, max_length=10)
    out = []
    for t in range(targets_in.shape[1]):
      log_probs, cache = decoder_lib.decode_step(model, params, cache, targets_in[:, t])
      out.append(log_probs)
    return jnp.stack(out, axis=1), cache

  got, cache = stepwise(params, targets_in, memory, paddings)
  expected = np.array(jax.nn.log_softmax(want, axis=-1))
  expected[..., PAD] = -np.inf
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # The self-attention buffers have the cache's length; the memory is projected once.
  block = cache['block_0']
  assert block['self_attention']['key'].shape == (2, 10, 4, 8)
  assert block['cross_attention']['key'].shape == (2, 10, 4, 8)  # T = 10 frames
  assert int(block['self_attention']['index']) == 7


def _check_hypothesis_format(ids):
  """Non-PAD tokens up to and including the first EOS, PAD after it."""
  for row in np.asarray(ids).tolist():
    end = row.index(EOS) + 1 if EOS in row else len(row)
    assert PAD not in row[:end], row
    assert all(i == PAD for i in row[end:]), row


def test_greedy_matches_stepwise_reference_and_beam_of_one():
  model = tiny_decoder(max_length=8)
  _, memory, paddings = random_inputs(4, batch=3)
  params = init(seed=4)
  greedy = jax.jit(functools.partial(decoder_lib.greedy_decode, model, max_length=8))
  ids = np.asarray(greedy(params, memory, paddings))
  _check_hypothesis_format(ids)
  # Reference: a plain Python loop of full forward passes, argmax over non-PAD.
  apply = jax.jit(model.apply)
  want = np.full((3, 8), PAD, np.int32)
  done = np.zeros(3, bool)
  for t in range(8):
    logits = np.array(apply(params, decoder_lib.shift_right(jnp.asarray(want)),
                              memory, paddings))[:, t]
    logits[:, PAD] = -np.inf
    token = np.where(done, PAD, np.argmax(logits, axis=-1))
    want[:, t] = token
    done |= token == EOS
  np.testing.assert_array_equal(ids, want)

  beam = jax.jit(functools.partial(decoder_lib.beam_search, model, beam_size=1,
                                   max_length=8))
  beam_ids, _ = beam(params, memory, paddings)
  np.testing.assert_array_equal(beam_ids, ids)


def _sequence_scores(apply, params, sequences, memory, paddings, length_penalty):
  """Teacher-forced score of each candidate for one example: sum log p / GNMT penalty."""
  n = len(sequences)
  targets = jnp.asarray(sequences, jnp.int32)
  logits = apply(params, decoder_lib.shift_right(targets),
                       jnp.repeat(memory[None], n, 0), jnp.repeat(paddings[None], n, 0))
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  token_lp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  lengths = np.array([sum(1 for i in s if i != PAD) for s in sequences])
  valid = np.arange(targets.shape[1])[None] < lengths[:, None]
  total = np.sum(np.where(valid, np.asarray(token_lp), 0.0), axis=1)
  return total / ((5.0 + lengths) / 6.0) ** length_penalty


def _all_hypotheses(vocab_size, max_length):
  """Every legal output: non-PAD, non-EOS tokens then EOS, or max_length such tokens."""
  words = range(EOS + 1, vocab_size)
  out = []
  for n in range(max_length):
    for prefix in itertools.product(words, repeat=n):
      out.append(list(prefix) + [EOS] + [PAD] * (max_length - n - 1))
  out += [list(p) for p in itertools.product(words, repeat=max_length)]
  return out


# alpha = 2 is strong enough to change some optima here (longer outputs win).
@pytest.mark.parametrize('length_penalty', [0.0, 2.0])
def test_wide_beam_finds_brute_force_optimum(length_penalty):
  max_length = 3
  beam_size = VOCAB ** max_length  # every hypothesis fits in the beam
  model = tiny_decoder(max_length=max_length)
  hypotheses = _all_hypotheses(VOCAB, max_length)
  assert len(hypotheses) == 1 + 4 + 16 + 64
  search = jax.jit(functools.partial(decoder_lib.beam_search, model, beam_size=beam_size,
                                     max_length=max_length, length_penalty=length_penalty))
  apply = jax.jit(model.apply)
  # Six seeds x 2 examples: enough that an early-stopping bound which ignores
  # the length penalty picks a wrong optimum in at least one case (checked).
  for seed in range(6):
    _, memory, paddings = random_inputs(10 + seed, frames=6)
    params = init(seed=10 + seed)
    ids, scores = search(params, memory, paddings)
    for b in range(2):
      brute = _sequence_scores(apply, params, hypotheses, memory[b], paddings[b],
                               length_penalty)
      order = np.argsort(-brute)
      assert brute[order[0]] - brute[order[1]] > 1e-4  # a unique optimum to find
      np.testing.assert_array_equal(ids[b], hypotheses[order[0]])
      np.testing.assert_allclose(scores[b], brute[order[0]], rtol=1e-5, atol=1e-5)


def test_adam_steps_lower_copy_task_loss():
  length = 6
  model = tiny_decoder(max_length=length, deterministic=False)
  rng = np.random.default_rng(5)
  source = rng.integers(EOS + 1, VOCAB, size=(8, length - 1))
  targets = np.concatenate([source, np.full((8, 1), EOS)], axis=1).astype(np.int32)
  # The "encoder" output is the one-hot source, padded to ENCODER_DIM channels.
  memory = np.zeros((8, length - 1, ENCODER_DIM), np.float32)
  memory[np.arange(8)[:, None], np.arange(length - 1)[None], source] = 1.0
  paddings = np.zeros((8, length - 1), np.float32)
  targets_in = decoder_lib.shift_right(jnp.asarray(targets))
  params = init(seed=5)  # the deterministic twin's params: same structure
  optimizer = optax.adam(3e-3)

  def loss_fn(params, key):
    logits = model.apply(params, targets_in, memory, paddings, rngs={'dropout': key})
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

  @jax.jit
  def step(params, opt_state, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for i in range(40):
    params, opt_state, loss = step(params, opt_state, jax.random.key(100 + i, impl='rbg'))
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.6 * losses[0], losses


def test_ids_to_text_cuts_at_eos():
  class Letters:
    def decode(self, ids):
      return ''.join('abcd'[i - 2] for i in ids)

  ids = np.array([[2, 3, EOS, PAD], [5, 4, 3, 2], [EOS, PAD, PAD, PAD]])
  assert decoder_lib.ids_to_text(ids, Letters()) == ['ab', 'dcba', '']
