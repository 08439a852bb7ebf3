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

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mslam_jax import special_ids
from mslam_jax.models import layers
from mslam_jax.models import passes
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

  def speech_codes(self, features, feature_paddings, temperature, gumbel_keys=None):
    """Frontend and quantizer only: (code_ids [B, T'], code_logits [B, T', V], paddings [B, T']).

    The same codes as the speech part of `__call__` for the same keys, at a
    fraction of its cost: gradient accumulation reads the whole batch's code
    statistics with it.
    """
    x, paddings = self.frontend(features, feature_paddings)
    _, code_ids, code_logits = self.quantizer(x, temperature, gumbel_keys)
    return code_ids, code_logits, paddings

  def __call__(self, batch, masks, temperature, *, tlm: bool = True, ctc: bool = True):
    """Every enabled path; batch and masks are dicts keyed by 'speech', 'text', 'paired'.

    A part missing from `batch` is skipped (that is how gin switches it off).
    masks (from `pretrain_loss.make_masks`): bool 'speech' [B, T'], 'text'
    [B, L], 'paired_speech', 'paired_text'; PRNG keys 'speech_gumbel' and
    'paired_gumbel' [B] for the quantizer in training.

    The paths run stage by stage (frontend, quantizer, speech layers, text
    embedding, shared layers, heads), and the inputs of a stage that have the
    same shape go through it as one batch (`passes.apply_merged`,
    `ModelConfig.merge_passes`; not the quantizer, see below).

    Returns a dict per part:
      speech (w2v-BERT): paddings [B, T']; quantized [B, T', code_dim],
        code_ids [B, T'] (the step's one speech target) and code_logits
        [B, T', V] from the unmasked features; context [B, T', code_dim] from
        the N-layer output of the masked input; code_pred_logits [B, T', V]
        from the top.
      text (SpanBERT): char_logits [B, L, vocab] from the masked characters.
      paired: paddings [B, T']; with `tlm` (packed [masked speech ; masked
        text] through the shared layers) code_ids [B, T'] (the quantizer's
        codes of the unmasked features, chosen as for unpaired speech),
        tlm_code_logits [B, T', V] and tlm_char_logits [B, L, vocab]; with
        `ctc` (clean speech through all layers) ctc_logits [B, T', vocab].
    """
    merged = functools.partial(passes.apply_merged, merge=self.config.merge_passes)
    speech, text, paired = (batch.get(part) for part in ('speech', 'text', 'paired'))
    has_speech, has_text = speech is not None, text is not None
    tlm, ctc = paired is not None and tlm, paired is not None and ctc

    def only(condition, make):  # the arguments of a pass that runs, None otherwise
      return make() if condition else None

    (x_s, pad_s), (x_p, pad_p) = (out or (None, None) for out in merged(self.frontend, [
        only(has_speech, lambda: (speech['features'], speech['feature_paddings'])),
        only(paired is not None, lambda: (paired['features'], paired['feature_paddings']))]))
    # Two quantizer calls: the TLM targets come from the same quantizer but do
    # not train it, and in one merged pass its backward would still run over
    # their rows (zero cotangents, real FLOPs).
    codes_s = only(has_speech, lambda: self.quantizer(x_s, temperature,
                                                       masks.get('speech_gumbel')))
    codes_p = only(tlm, lambda: self.quantizer(jax.lax.stop_gradient(x_p), temperature,
                                               masks.get('paired_gumbel')))
    h_s, h_tlm, h_ctc = merged(self.speech_layers, [
        only(has_speech, lambda: (self._masked_speech(x_s, masks.get('speech')), pad_s)),
        only(tlm, lambda: (self._masked_speech(x_p, masks.get('paired_speech')), pad_p)),
        only(ctc, lambda: (x_p, pad_p))])
    t_text, t_tlm = merged(self.text_embedding, [
        only(has_text, lambda: (jnp.where(masks['text'], special_ids.MASK_ID, text['ids']),
                                text['id_paddings'])),
        only(tlm, lambda: (jnp.where(masks['paired_text'], special_ids.MASK_ID, paired['ids']),
                           paired['id_paddings']))])
    joint, joint_paddings, text_positions = (
        pack_speech_text(h_tlm, pad_p, t_tlm, paired['id_paddings']) if tlm else (None,) * 3)
    top_s, top_text, top_tlm, top_ctc = merged(self.shared_layers, [
        only(has_speech, lambda: (h_s, pad_s)),
        only(has_text, lambda: (t_text, text['id_paddings'])),
        only(tlm, lambda: (joint, joint_paddings)),
        only(ctc, lambda: (h_ctc, pad_p))])
    code_pred, tlm_code = merged(self.code_head, [
        only(has_speech, lambda: (top_s,)),
        only(tlm, lambda: (top_tlm[:, :h_tlm.shape[1]],))])
    chars, tlm_chars = merged(self.char_head, [
        only(has_text, lambda: (top_text,)),
        only(tlm, lambda: (jnp.take_along_axis(top_tlm, text_positions[..., None], axis=1),))])

    outputs = {}
    if has_speech:
      quantized, code_ids, code_logits = codes_s
      outputs['speech'] = dict(
          paddings=pad_s, quantized=quantized, code_ids=code_ids, code_logits=code_logits,
          context=self.context_projection(h_s), code_pred_logits=code_pred)
    if has_text:
      outputs['text'] = dict(char_logits=chars)
    if paired is not None:
      outputs['paired'] = dict(paddings=pad_p)
      if tlm:
        outputs['paired'].update(code_ids=codes_p[1], tlm_code_logits=tlm_code,
                                 tlm_char_logits=tlm_chars)
      if ctc:
        outputs['paired']['ctc_logits'] = self.ctc_head(top_ctc)
    return outputs
