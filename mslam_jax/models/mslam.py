"""The mSLAM encoder with its pre-training heads (Bapna et al. 2022, arXiv:2202.01374).

    speech: log-mel -> frontend -> [mask] -> N speech layers -> M shared layers
    text:   chars -> [mask] -> embedding + sinusoid + ln -> M shared layers
    paired: [speech after N layers ; transcript embeddings] packed in time -> M shared layers

All three paths share the M shared layers; the frontend and N speech-only
layers are shared by the speech and paired paths. Methods return raw outputs;
the losses live in `mslam_jax.losses` and are combined in `mslam_jax.pretrain_loss`.

Batch layout (every sequence right-padded; paddings float, 1 = pad):
  speech: features [B, T, mel], feature_paddings [B, T]
  text:   ids int32 [B, L], id_paddings [B, L]
  paired: all four of the above
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mslam_jax import special_ids
from mslam_jax.models import layers
from mslam_jax.models.config import ModelConfig
from mslam_jax.models.conformer import ConformerStack
from mslam_jax.models.frontend import ConvSubsampling
from mslam_jax.models.quantizer import GumbelQuantizer
from mslam_jax.models.text_embedding import TextEmbedding


def pack_speech_text(speech: jax.Array, speech_paddings: jax.Array,
                     text: jax.Array, text_paddings: jax.Array):
  """Concatenates each example's valid speech and valid text, leaving no gap.

  Example b's output holds speech[b, :Ls] then text[b, :Lt] then padding, with
  Ls, Lt its valid lengths, so its content never depends on padded lengths.

  Args:
    speech: [B, Ts, d]; speech_paddings: [B, Ts].
    text: [B, Lt_max, d]; text_paddings: [B, Lt_max].

  Returns:
    joint [B, Ts + Lt_max, d], joint_paddings [B, Ts + Lt_max], and
    text_positions int32 [B, Lt_max]: where text position j landed.
  """
  speech_len = layers.lengths_from_paddings(speech_paddings)[:, None]  # [B, 1]
  text_len = layers.lengths_from_paddings(text_paddings)[:, None]
  speech_frames, text_chars = speech.shape[1], text.shape[1]
  positions = jnp.arange(speech_frames + text_chars)[None, :]  # [1, T]
  text_index = jnp.clip(positions - speech_len, 0, text_chars - 1)
  from_text = jnp.take_along_axis(text, text_index[..., None], axis=1)
  from_speech = jnp.pad(speech, ((0, 0), (0, text_chars), (0, 0)))
  joint = jnp.where((positions < speech_len)[..., None], from_speech, from_text)
  joint_paddings = (positions >= speech_len + text_len).astype(speech_paddings.dtype)
  joint = layers.zero_padded(joint, joint_paddings)
  text_positions = speech_len + jnp.arange(text_chars)[None, :]
  return joint, joint_paddings, text_positions


class MSLAM(nn.Module):
  """mSLAM encoder (frontend, N speech layers, M shared layers, text embedding) and heads.

  Attributes:
    config: the architecture (ModelConfig, bound from gin).
    deterministic: False in training: dropout on and Gumbel noise in the quantizer.
  """
  config: ModelConfig
  deterministic: bool = True

  def setup(self):
    cfg, det = self.config, self.deterministic
    self.frontend = ConvSubsampling(cfg)
    self.speech_layers = ConformerStack(cfg, cfg.num_speech_layers, det)
    self.shared_layers = ConformerStack(cfg, cfg.num_shared_layers, det)
    self.text_embedding = TextEmbedding(cfg)
    self.mask_embedding = self.param(
        'mask_embedding', layers.logical_init(nn.initializers.uniform(1.0), ('embed',)),
        (cfg.d_model,), jnp.float32)
    self.quantizer = GumbelQuantizer(cfg, det)
    dtype = cfg.compute_dtype
    # Contrastive: N-layer output projected to the code space.
    self.context_projection = layers.dense(cfg.code_dim, ('embed', 'code_dim'),
                                           name='context_projection', dtype=dtype)
    # Masked prediction of code ids (speech MLM and the speech half of TLM).
    self.code_head = layers.dense(cfg.num_codes, ('embed', 'codes'), name='code_head',
                                  dtype=dtype)
    # Masked prediction of characters (SpanBERT and the text half of TLM).
    self.char_head = layers.dense(cfg.vocab_size, ('embed', 'vocab'), name='char_head',
                                  dtype=dtype)
    # CTC over characters; the pad id doubles as the blank.
    self.ctc_head = layers.dense(cfg.vocab_size, ('embed', 'vocab'), name='ctc_head',
                                 dtype=dtype)

  # ---- encoder paths (also used by export) ---------------------------------

  def _masked_speech(self, x, mask):
    if mask is None:
      return x
    return jnp.where(mask[..., None], self.mask_embedding.astype(x.dtype), x)

  def encode_speech(self, features: jax.Array, feature_paddings: jax.Array):
    """Unmasked speech through all layers: [B, T, mel] -> ([B, T', d], paddings [B, T'])."""
    x, paddings = self.frontend(features, feature_paddings)
    x = self.speech_layers(x, paddings)
    return self.shared_layers(x, paddings), paddings

  def encode_text(self, ids: jax.Array, id_paddings: jax.Array):
    """Text through the shared layers: ids [B, L] -> ([B, L, d], paddings [B, L])."""
    x = self.text_embedding(ids, id_paddings)
    return self.shared_layers(x, id_paddings), id_paddings

  # ---- pre-training -----------------------------------------------------------

  def speech_outputs(self, features, feature_paddings, mask, temperature, gumbel_keys=None):
    """w2v-BERT pass. mask bool [B, T'] over encoder frames; gumbel_keys [B] in training.

    Returns a dict: paddings [B, T']; quantized [B, T', code_dim], code_ids
    [B, T'] (the step's one speech target) and code_logits [B, T', V] from the
    unmasked features; context [B, T', code_dim] from the N-layer output;
    code_pred_logits [B, T', V] from the top.
    """
    x, paddings = self.frontend(features, feature_paddings)
    quantized, code_ids, code_logits = self.quantizer(x, temperature, gumbel_keys)
    h = self.speech_layers(self._masked_speech(x, mask), paddings)
    top = self.shared_layers(h, paddings)
    return dict(
        paddings=paddings,
        quantized=quantized,
        code_ids=code_ids,
        code_logits=code_logits,
        context=self.context_projection(h),
        code_pred_logits=self.code_head(top))

  def speech_codes(self, features, feature_paddings, temperature, gumbel_keys=None):
    """Frontend and quantizer only: (code_ids [B, T'], code_logits [B, T', V], paddings [B, T']).

    The same codes as `speech_outputs` for the same keys, at a fraction of its
    cost: gradient accumulation reads the whole batch's code statistics with it.
    """
    x, paddings = self.frontend(features, feature_paddings)
    _, code_ids, code_logits = self.quantizer(x, temperature, gumbel_keys)
    return code_ids, code_logits, paddings

  def text_outputs(self, ids, id_paddings, mask):
    """SpanBERT pass. mask bool [B, L] -> dict(char_logits [B, L, vocab])."""
    masked_ids = jnp.where(mask, special_ids.MASK_ID, ids)
    top, _ = self.encode_text(masked_ids, id_paddings)
    return dict(char_logits=self.char_head(top))

  def paired_outputs(self, features, feature_paddings, ids, id_paddings,
                     speech_mask, text_mask, temperature=1.0, gumbel_keys=None, *,
                     tlm: bool = True, ctc: bool = True):
    """TLM pass on packed [masked speech ; masked text] and a CTC pass on clean speech.

    Returns a dict with paddings [B, T'], code_ids [B, T'] (TLM speech targets:
    the quantizer's codes of the unmasked features, chosen as for unpaired
    speech), and when enabled tlm_code_logits [B, T', V], tlm_char_logits
    [B, L, vocab], ctc_logits [B, T', vocab].
    """
    x, paddings = self.frontend(features, feature_paddings)
    out = dict(paddings=paddings)
    if tlm:
      _, code_ids, _ = self.quantizer(jax.lax.stop_gradient(x), temperature, gumbel_keys)
      h = self.speech_layers(self._masked_speech(x, speech_mask), paddings)
      masked_ids = jnp.where(text_mask, special_ids.MASK_ID, ids)
      t = self.text_embedding(masked_ids, id_paddings)
      joint, joint_paddings, text_positions = pack_speech_text(h, paddings, t, id_paddings)
      top = self.shared_layers(joint, joint_paddings)
      speech_top = top[:, :h.shape[1]]
      text_top = jnp.take_along_axis(top, text_positions[..., None], axis=1)
      out.update(code_ids=code_ids,
                 tlm_code_logits=self.code_head(speech_top),
                 tlm_char_logits=self.char_head(text_top))
    if ctc:
      top = self.shared_layers(self.speech_layers(x, paddings), paddings)
      out.update(ctc_logits=self.ctc_head(top))
    return out

  def __call__(self, batch, masks, temperature, *, tlm: bool = True, ctc: bool = True):
    """Every enabled path: batch/masks are dicts keyed by 'speech', 'text', 'paired'.

    A part missing from `batch` is skipped (that is how gin switches it off).
    masks (from `pretrain_loss.make_masks`): bool 'speech' [B, T'], 'text'
    [B, L], 'paired_speech', 'paired_text'; PRNG keys 'speech_gumbel' and
    'paired_gumbel' [B] for the quantizer in training.
    """
    outputs = {}
    if 'speech' in batch:
      s = batch['speech']
      outputs['speech'] = self.speech_outputs(
          s['features'], s['feature_paddings'], masks['speech'], temperature,
          masks.get('speech_gumbel'))
    if 'text' in batch:
      t = batch['text']
      outputs['text'] = self.text_outputs(t['ids'], t['id_paddings'], masks['text'])
    if 'paired' in batch:
      p = batch['paired']
      outputs['paired'] = self.paired_outputs(
          p['features'], p['feature_paddings'], p['ids'], p['id_paddings'],
          masks.get('paired_speech'), masks.get('paired_text'), temperature,
          masks.get('paired_gumbel'), tlm=tlm, ctc=ctc)
    return outputs
