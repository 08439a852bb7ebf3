"""Transformer decoder for speech translation on top of the mSLAM encoder, and decoding.

mSLAM (Bapna et al. 2022) fine-tunes speech translation (CoVoST-2) by
adding a Transformer decoder over the encoder output; the decoder here is that
head: characters in, characters out, attending to the encoder frames.

    targets_in [B, L] -> embed + sinusoid -> N x (causal self-attn, cross-attn,
    ffn; each pre-LayerNorm with a residual) -> ln -> logits [B, L, vocab]

Token conventions (mslam_jax.special_ids, T5/seqio style): the decoder input
is the target shifted right with PAD_ID (0) as the start token, EOS_ID (1)
ends a hypothesis, and PAD fills every position after EOS. Decoding never
emits PAD (it would be indistinguishable from the filler; fairseq does the
same), so a hypothesis is non-PAD tokens up to and including EOS, or
`max_length` tokens without EOS.

Decoding is incremental (the usual key/value cache, as in flax's WMT example
and t5x): a decoder cloned with `decode=True` keeps each block's self-attention
keys and values of the tokens so far, and the cross-attention keys and values of
the memory, in the 'cache' collection; a step feeds one token per row and costs
O(length) attention instead of a full pass. `init_cache` builds that cache
from one teacher-forced pass over a zero buffer (which fixes its length and
projects the memory once). Both decoders are checked against full
teacher-forced passes (tests/test_decoder.py).

Both decoders are traceable; jit them with the static arguments bound, e.g.
    search = jax.jit(functools.partial(beam_search, decoder, beam_size=4,
                                       max_length=256, length_penalty=0.6))
    ids, scores = search({'params': params}, memory, memory_paddings)
"""

import dataclasses
from typing import Optional, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from mslam_jax import special_ids
from mslam_jax.models import layers

@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Sizes of the speech-translation decoder.

  Attributes:
    num_layers: decoder blocks (paper: 6, the CoVoST-2 Transformer decoder).
    d_model: model dim (paper: 512).
    num_heads: attention heads, self and cross (ours: 8, Transformer-base).
    ffn_dim: feed-forward hidden width (ours: 2048, Transformer-base 4 x d).
    dropout_rate: dropout after the embedding and on every residual branch
      (ours: 0.1, Transformer-base).
    vocab_size: output characters incl. reserved ids (paper: the 4096-symbol
      character vocabulary shared with pre-training).
    max_length: longest target in tokens incl. EOS (ours: 256, enough for
      CoVoST-2 sentences in characters); bounds the decoder input length.
  """
  num_layers: int = 6
  d_model: int = 512
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout_rate: float = 0.1
  vocab_size: int = 4096
  max_length: int = 256

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(
          f'DecoderConfig: d_model={self.d_model} is not divisible by '
          f'num_heads={self.num_heads}; change one of them in gin.')
    if self.vocab_size <= special_ids.EOS_ID + 1:
      raise ValueError(
          f'DecoderConfig: vocab_size={self.vocab_size} leaves no room for tokens '
          f'beyond PAD={special_ids.PAD_ID} and EOS={special_ids.EOS_ID}.')
    if min(self.num_layers, self.ffn_dim, self.max_length) < 1:
      raise ValueError('DecoderConfig: num_layers, ffn_dim and max_length must be >= 1.')


def shift_right(targets: jax.Array) -> jax.Array:
  """Decoder input from targets: [B, L] -> [PAD, targets[:, :-1]] (PAD = start token)."""
  start = jnp.full_like(targets[:, :1], special_ids.PAD_ID)
  return jnp.concatenate([start, targets[:, :-1]], axis=1)


class _Attention(nn.Module):
  """ln(x) -> q; keys and values -> masked softmax attention -> out -> dropout.

  Self-attention (cross=False) takes k, v from the normalised x under a causal
  mask; cross-attention takes them from the projected memory under its
  validity mask. With decode=True the keys and values live in the 'cache'
  collection: self-attention appends this step's k, v at the cache index
  (x is [B, 1, d]) and attends to positions <= index; cross-attention projects
  the memory once, when the cache is built, and reads it back afterwards.
  """
  config: DecoderConfig
  cross: bool = False
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x, memory=None, mask=None):
    """x [B, L, d], memory [B, T, d] (cross only), mask [B, 1, 1, T] -> [B, L, d]."""
    cfg = self.config
    head_dim = cfg.d_model // cfg.num_heads
    h = layers.layer_norm(name='ln')(x)

    def projection(name):
      return layers.MultiAxisDense((cfg.num_heads, head_dim), num_in_axes=1,
                                   axes=('embed', 'heads', 'kv'), name=name)

    q = projection('query')(h)  # [B, L, N, H]
    building = self.decode and not self.has_variable('cache', 'key')
    if self.cross and self.decode and not building:
      k, v = self.get_variable('cache', 'key'), self.get_variable('cache', 'value')
    else:
      source = memory if self.cross else h
      k, v = projection('key')(source), projection('value')(source)  # [B, T, N, H]
    causal = not self.cross
    if self.decode:
      if building:
        # The cache pass: cross keys/values are kept; self-attention's buffers
        # take this pass' length and start empty at index 0.
        keep = (k, v) if self.cross else (jnp.zeros_like(k), jnp.zeros_like(v))
        self.put_variable('cache', 'key', keep[0])
        self.put_variable('cache', 'value', keep[1])
        if not self.cross:
          self.put_variable('cache', 'index', jnp.zeros((), jnp.int32))
      elif not self.cross:
        index = self.get_variable('cache', 'index')
        k = jax.lax.dynamic_update_slice_in_dim(self.get_variable('cache', 'key'), k, index, 1)
        v = jax.lax.dynamic_update_slice_in_dim(self.get_variable('cache', 'value'), v, index,
                                                1)
        self.put_variable('cache', 'key', k)
        self.put_variable('cache', 'value', v)
        self.put_variable('cache', 'index', index + x.shape[1])
        mask = (jnp.arange(k.shape[1]) <= index)[None, None, None, :]
        causal = False
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    out = nn.with_logical_constraint(out, ('batch', 'length', 'heads', 'kv'))
    out = layers.MultiAxisDense((cfg.d_model,), num_in_axes=2, axes=('heads', 'kv', 'embed'),
                                name='out')(out)
    return nn.Dropout(cfg.dropout_rate)(out, deterministic=self.deterministic)


class _FeedForward(nn.Module):
  """ln -> dense(d, ffn) -> relu -> dense(ffn, d) -> dropout (Transformer-base)."""
  config: DecoderConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = layers.layer_norm(name='ln')(x)
    h = layers.dense(cfg.ffn_dim, ('embed', 'mlp'), name='wi')(h)
    h = nn.with_logical_constraint(nn.relu(h), ('batch', 'length', 'mlp'))
    h = layers.dense(cfg.d_model, ('mlp', 'embed'), name='wo')(h)
    return nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)


class _DecoderBlock(nn.Module):
  """x -> +causal self-attn -> +cross-attn -> +ffn, each branch pre-LayerNorm."""
  config: DecoderConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x, memory, memory_mask):
    cfg, det = self.config, self.deterministic
    x = nn.with_logical_constraint(x, layers.BATCH_LENGTH_EMBED)
    x = x + _Attention(cfg, False, det, self.decode, name='self_attention')(x)
    x = x + _Attention(cfg, True, det, self.decode, name='cross_attention')(
        x, memory, memory_mask)
    x = x + _FeedForward(cfg, det, name='ffn')(x)
    return nn.with_logical_constraint(x, layers.BATCH_LENGTH_EMBED)


class TransformerDecoder(nn.Module):
  """Pre-LayerNorm Transformer decoder: (targets_in, encoder memory) -> logits.

  Blocks are a Python loop (parameters 'block_0' ...), not nn.scan: six small
  layers compile quickly and need no remat (ours).

  Attributes:
    config: the sizes.
    encoder_dim: channel dim of the encoder output; the memory is projected to
      d_model once per call and shared by every block's cross-attention.
    deterministic: disables dropout (evaluation and decoding).
    decode: incremental decoding with the 'cache' collection (see init_cache
      and decode_step); the parameters are the same as without.
  """
  config: DecoderConfig
  encoder_dim: int
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, targets_in: jax.Array, memory: Optional[jax.Array],
               memory_paddings: Optional[jax.Array]) -> jax.Array:
    """Teacher-forced logits, or one decoding step with the cache.

    Args:
      targets_in: [B, L] int32 decoder input (shift_right of the targets); in
        a decoding step (decode=True, cache built) [B, 1], the previous token.
      memory: [B, T, encoder_dim] encoder output (ignored in a decoding step).
      memory_paddings: [B, T] float, 1.0 at padded frames (ditto).

    Returns:
      [B, L, vocab_size] float32 logits; position t predicts target t from
      targets_in[:, :t + 1] and the valid memory frames only.
    """
    cfg = self.config
    length = targets_in.shape[1]
    if length > cfg.max_length:
      raise ValueError(
          f'TransformerDecoder: target length {length} exceeds DecoderConfig.max_length='
          f'{cfg.max_length}; truncate the targets or raise the limit in gin.')
    stepping = self.decode and self.has_variable('cache', 'memory_mask')
    if stepping:
      position = self.get_variable('cache', 'position')
      self.put_variable('cache', 'position', position + length)
      memory, memory_mask = None, self.get_variable('cache', 'memory_mask')
      positions = layers.sinusoidal_positions(length, cfg.d_model, offset=position)
    else:
      if memory.shape[-1] != self.encoder_dim:
        raise ValueError(f'TransformerDecoder: memory has {memory.shape[-1]} channels, '
                         f'encoder_dim={self.encoder_dim}.')
      # Padded frames are zeroed before the projection as well as masked in the
      # attention, so even an example whose memory is all padding (every key
      # masked, softmax uniform) cannot read what was in the padding.
      memory = layers.zero_padded(memory, memory_paddings)
      memory = layers.dense(cfg.d_model, ('encoder_embed', 'embed'),
                            name='memory_projection')(memory)
      memory = nn.with_logical_constraint(memory, layers.BATCH_LENGTH_EMBED)
      memory_mask = (memory_paddings < 0.5)[:, None, None, :]  # [B, 1, 1, T]
      positions = layers.sinusoidal_positions(length, cfg.d_model)
      if self.decode:  # building the cache: its length is this pass' length
        self.put_variable('cache', 'memory_mask', memory_mask)
        self.put_variable('cache', 'position', jnp.zeros((), jnp.int32))

    embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32,
        embedding_init=layers.logical_init(nn.initializers.normal(stddev=1.0),
                                           ('vocab', 'embed')),
        name='embed')
    x = embed(targets_in) + positions[None]
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)
    for i in range(cfg.num_layers):
      x = _DecoderBlock(cfg, self.deterministic, self.decode, name=f'block_{i}')(
          x, memory, memory_mask)
    x = layers.layer_norm(name='ln_out')(x)
    logits = layers.dense(cfg.vocab_size, ('embed', 'vocab'), name='logits')(x)
    return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))


def init_cache(decoder: TransformerDecoder, variables, memory: jax.Array,
               memory_paddings: jax.Array, max_length: int):
  """The decoding cache for up to `max_length` tokens per row of `memory`.

  Returns the 'cache' collection: per block the self-attention buffers
  [B, max_length, heads, head_dim] (empty, index 0) and the cross-attention
  keys and values of the projected memory [B, T, heads, head_dim].
  """
  step_decoder = decoder.clone(decode=True, deterministic=True)
  buffer = jnp.zeros((memory.shape[0], max_length), jnp.int32)
  _, state = step_decoder.apply(variables, buffer, memory, memory_paddings, mutable=['cache'])
  return state['cache']


def decode_step(decoder: TransformerDecoder, variables, cache, tokens: jax.Array):
  """(log-probs [N, V] of the next token with PAD forbidden, updated cache).

  tokens: [N] the previous token of each row (PAD, the start token, first).
  """
  step_decoder = decoder.clone(decode=True, deterministic=True)
  logits, state = step_decoder.apply({**variables, 'cache': cache}, tokens[:, None], None,
                                     None, mutable=['cache'])
  log_probs = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)
  # Masked after the softmax: scores stay the model's own log-probs.
  return log_probs.at[:, special_ids.PAD_ID].set(-jnp.inf), state['cache']


def _previous_tokens(ids: jax.Array, step: jax.Array) -> jax.Array:
  """The token each row feeds at `step`: PAD (the start token) first, then ids[..., step - 1]."""
  last = jax.lax.dynamic_index_in_dim(ids, step - 1, axis=ids.ndim - 1, keepdims=False)
  return jnp.where(step == 0, special_ids.PAD_ID, last)


def greedy_decode(decoder: TransformerDecoder, variables, memory: jax.Array,
                  memory_paddings: jax.Array, *, max_length: int) -> jax.Array:
  """Argmax decoding (PAD excluded), one token per step, until every row has emitted EOS.

  Args:
    decoder: the TransformerDecoder (its decode flag is set here).
    variables: its variables, {'params': ...}.
    memory: [B, T, D] encoder output.
    memory_paddings: [B, T], 1.0 at padded frames.
    max_length: number of tokens to generate at most (static).

  Returns:
    int32 [B, max_length]: generated tokens, EOS included, PAD after it.
  """
  batch = memory.shape[0]

  def cond(state):
    step, _, finished, _ = state
    return (step < max_length) & ~jnp.all(finished)

  def body(state):
    step, ids, finished, cache = state
    log_probs, cache = decode_step(decoder, variables, cache, _previous_tokens(ids, step))
    token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    token = jnp.where(finished, special_ids.PAD_ID, token)
    ids = jax.lax.dynamic_update_index_in_dim(ids, token, step, axis=1)
    return step + 1, ids, finished | (token == special_ids.EOS_ID), cache

  init = (jnp.int32(0), jnp.full((batch, max_length), special_ids.PAD_ID, jnp.int32),
          jnp.zeros((batch,), bool),
          init_cache(decoder, variables, memory, memory_paddings, max_length))
  return jax.lax.while_loop(cond, body, init)[1]


def _length_penalty(length, alpha: float):
  """GNMT length normaliser ((5 + length) / 6) ** alpha (Wu et al. 2016); 1 when alpha = 0."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_search(decoder: TransformerDecoder, variables, memory: jax.Array,
                memory_paddings: jax.Array, *, beam_size: int, max_length: int,
                length_penalty: float = 0.0) -> Tuple[jax.Array, jax.Array]:
  """Beam search for the best finished hypothesis per example.

  A hypothesis' score is its summed token log-prob, divided by the GNMT
  penalty ((5 + len) / 6) ** length_penalty when length_penalty > 0 (len
  counts EOS). Each step extends the K alive hypotheses by every token, keeps
  the top 2K candidates, finishes those that end in EOS *and* rank within the
  top K (fairseq's rule: an EOS hypothesis is finished only if it would have
  been in the beam, which makes beam_size=1 exactly greedy), and keeps the K
  best non-EOS candidates alive. At step max_length every alive hypothesis
  counts as finished at length max_length. The loop ends early once, for every
  example, the best finished score is at least the best score any alive
  hypothesis could still reach (log-probs only fall and, for length_penalty
  >= 0, the penalty's divisor is largest at max_length), so stopping early
  never changes the result (up to exact ties).

  Args:
    decoder: the TransformerDecoder (its decode flag is set here).
    variables: its variables, {'params': ...}.
    memory: [B, T, D] encoder output.
    memory_paddings: [B, T], 1.0 at padded frames.
    beam_size: K >= 1 (static).
    max_length: tokens per hypothesis at most (static).
    length_penalty: GNMT alpha >= 0 (static); 0 ranks by summed log-prob.

  Returns:
    (ids int32 [B, max_length] with EOS included and PAD after it,
     scores float32 [B] of those hypotheses).
  """
  if beam_size < 1 or max_length < 1 or length_penalty < 0:
    raise ValueError(f'beam_search: beam_size={beam_size} and max_length={max_length} '
                     f'must be >= 1 and length_penalty={length_penalty} >= 0.')
  batch = memory.shape[0]
  k = beam_size
  neg_inf = jnp.float32(-jnp.inf)
  # Every beam row sees its example's memory: [B * K, T, D], example-major.
  beam_memory = jnp.repeat(memory, k, axis=0)
  beam_paddings = jnp.repeat(memory_paddings, k, axis=0)
  max_penalty = _length_penalty(max_length, length_penalty)

  def take(x, index):
    """x [B, M, ...], index [B, N] -> [B, N, ...] (per-example gather)."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

  def reorder(cache, parent):
    """Self-attention buffers follow their hypotheses: row (b, j) <- row (b, parent[b, j]).

    The cross-attention keys/values are the same for all K rows of an example
    and the indices are shared, so only the self-attention buffers move.
    """
    def follow(path, x):
      if 'self_attention' not in jax.tree_util.keystr(path) or x.ndim == 0:
        return x
      return take(x.reshape((batch, k) + x.shape[1:]), parent).reshape(x.shape)
    return jax.tree_util.tree_map_with_path(follow, cache)

  def alive_bound(alive_log_probs):
    # Best final score reachable from any alive hypothesis (see docstring).
    return jnp.max(alive_log_probs, axis=1) / max_penalty

  def cond(state):
    step, _, alive_log_probs, _, finished_scores, _ = state
    best_finished = jnp.max(finished_scores, axis=1)
    done = best_finished >= alive_bound(alive_log_probs)
    return (step < max_length) & ~jnp.all(done)

  def body(state):
    step, alive_ids, alive_log_probs, finished_ids, finished_scores, cache = state
    log_probs, cache = decode_step(decoder, variables, cache,
                                   _previous_tokens(alive_ids, step).reshape(batch * k))
    vocab = log_probs.shape[-1]
    candidates = alive_log_probs[:, :, None] + log_probs.reshape(batch, k, vocab)
    top_log_probs, top_index = jax.lax.top_k(candidates.reshape(batch, k * vocab), 2 * k)
    parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    top_ids = jax.lax.dynamic_update_index_in_dim(take(alive_ids, parent), token, step, axis=2)

    is_eos = token == special_ids.EOS_ID  # [B, 2K]
    last_step = step == max_length - 1
    in_beam = jnp.arange(2 * k) < k
    finishes = (is_eos & in_beam) | last_step
    new_scores = jnp.where(finishes, top_log_probs / _length_penalty(step + 1, length_penalty),
                           neg_inf)
    merged_scores = jnp.concatenate([finished_scores, new_scores], axis=1)  # [B, 3K]
    merged_ids = jnp.concatenate([finished_ids, top_ids], axis=1)
    finished_scores, keep = jax.lax.top_k(merged_scores, k)
    finished_ids = take(merged_ids, keep)

    # EOS candidates are never alive; at most K of the 2K end in EOS (one per
    # parent), so K non-EOS candidates always remain.
    alive_candidates = jnp.where(is_eos, neg_inf, top_log_probs)
    alive_log_probs, keep = jax.lax.top_k(alive_candidates, k)
    alive_ids = take(top_ids, keep)
    cache = reorder(cache, take(parent, keep))
    return step + 1, alive_ids, alive_log_probs, finished_ids, finished_scores, cache

  # Only the first beam is live at the start, so the K copies of the empty
  # prefix do not fill the beam with duplicates.
  init_log_probs = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, neg_inf)[None], (batch, 1))
  empty = jnp.full((batch, k, max_length), special_ids.PAD_ID, jnp.int32)
  init = (jnp.int32(0), empty, init_log_probs.astype(jnp.float32), empty,
          jnp.full((batch, k), neg_inf),
          init_cache(decoder, variables, beam_memory, beam_paddings, max_length))
  _, _, _, finished_ids, finished_scores, _ = jax.lax.while_loop(cond, body, init)
  # top_k keeps the finished set sorted, so slot 0 is the best.
  return finished_ids[:, 0], finished_scores[:, 0]


def ids_to_text(ids, vocab) -> list:
  """Decoded strings of [B, L] token ids, each cut at its first EOS (PAD dropped).

  `vocab` is anything with .decode(list_of_ids) -> str (CharacterVocabulary).
  """
  texts = []
  for row in np.asarray(ids).tolist():
    if special_ids.EOS_ID in row:
      row = row[:row.index(special_ids.EOS_ID)]
    texts.append(vocab.decode([i for i in row if i != special_ids.PAD_ID]))
  return texts

