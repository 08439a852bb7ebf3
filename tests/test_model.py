"""mSLAM model: output shapes of every path, padding invariance, logical axis names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SMALL_BATCH, small_batch
from mslam_jax import pretrain_loss
from mslam_jax.models.config import REMAT_POLICIES, ModelConfig
from mslam_jax.models.conformer import ConformerBlock
from mslam_jax.models.mslam import MSLAM, pack_speech_text


def _init(model_config, loss_config, batch):
  init = jax.jit(lambda rng, b: pretrain_loss.init_params(
      rng, b, model_config=model_config, loss_config=loss_config))
  return init(jax.random.key(0), batch)


def test_output_shapes_of_every_path(tiny):
  mc, lc = tiny
  batch = small_batch()
  params = _init(mc, lc, batch)
  masks = pretrain_loss.make_masks(jax.random.key(1), batch, lc)
  out = jax.jit(MSLAM(mc).apply)(params, batch, masks, 1.0)
  b, d, v, codes = 2, mc.d_model, mc.vocab_size, mc.num_codes
  frames = -(-SMALL_BATCH.speech_frames // 4)  # two stride-2 convs
  chars = SMALL_BATCH.text_length
  expect = {
      ('speech', 'paddings'): (b, frames),
      ('speech', 'quantized'): (b, frames, mc.code_dim),
      ('speech', 'code_ids'): (b, frames),
      ('speech', 'code_logits'): (b, frames, codes),
      ('speech', 'context'): (b, frames, mc.code_dim),
      ('speech', 'code_pred_logits'): (b, frames, codes),
      ('text', 'char_logits'): (b, chars, v),
      ('paired', 'paddings'): (b, frames),
      ('paired', 'code_ids'): (b, frames),
      ('paired', 'tlm_code_logits'): (b, frames, codes),
      ('paired', 'tlm_char_logits'): (b, SMALL_BATCH.paired_text_length, v),
      ('paired', 'ctc_logits'): (b, frames, v),
  }
  got = {(part, k): out[part][k].shape for part in out for k in out[part]}
  assert got == expect
  assert masks['negatives'].shape == (b, frames, lc.num_negatives)
  s = batch['speech']
  enc, enc_pad = MSLAM(mc).apply(params, s['features'], s['feature_paddings'],
                                 method=MSLAM.encode_speech)
  assert enc.shape == (b, frames, d) and enc_pad.shape == (b, frames)
  t = batch['text']
  enc, _ = MSLAM(mc).apply(params, t['ids'], t['id_paddings'], method=MSLAM.encode_text)
  assert enc.shape == (b, chars, d)


def _pad(x, length, fill_rng=None):
  """Right-pads axis 1 to `length` with zeros, or with garbage from fill_rng."""
  extra = length - x.shape[1]
  shape = (x.shape[0], extra) + x.shape[2:]
  fill = (np.zeros(shape, x.dtype) if fill_rng is None
          else (fill_rng.normal(size=shape) * 50).astype(x.dtype)
          if x.dtype.kind == 'f' else fill_rng.integers(4, 50, size=shape).astype(x.dtype))
  return np.concatenate([x, fill], axis=1)


def _paddings(lengths, total):
  return (np.arange(total)[None] >= np.asarray(lengths)[:, None]).astype(np.float32)


def test_conformer_block_is_padding_invariant(tiny):
  mc, _ = tiny
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, mc.d_model)).astype(np.float32)
  lengths = [9, 5]
  block = ConformerBlock(mc)
  params = block.init(jax.random.key(0), x, _paddings(lengths, 9))
  short, _ = block.apply(params, x * (1 - _paddings(lengths, 9))[..., None],
                         _paddings(lengths, 9))
  long_x = _pad(x, 16, rng)
  long_x[1, 5:9] = rng.normal(size=(4, mc.d_model)) * 50  # garbage inside the padding too
  long, _ = block.apply(params, long_x, _paddings(lengths, 16))
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(long[b, :n], short[b, :n], rtol=2e-4, atol=2e-4)
    assert np.all(np.asarray(long[b, n:]) == 0)


def test_every_path_is_padding_invariant(tiny):
  """Valid outputs are the same whatever the padded length and padded content."""
  mc, lc = tiny
  rng = np.random.default_rng(1)
  mel_lengths, text_lengths = [37, 22], [20, 9]
  feats = rng.normal(size=(2, 40, 80)).astype(np.float32)
  ids = rng.integers(4, 20, size=(2, 20)).astype(np.int32)
  batch_small = {
      'speech': {'features': feats, 'feature_paddings': _paddings(mel_lengths, 40)},
      'text': {'ids': ids, 'id_paddings': _paddings(text_lengths, 20)},
      'paired': {'features': feats, 'feature_paddings': _paddings(mel_lengths, 40),
                 'ids': ids[:, :12], 'id_paddings': _paddings([12, 9], 12)},
  }
  for b, n in enumerate(mel_lengths):
    feats[b, n:] = 0
  batch_small = jax.tree.map(np.copy, batch_small)
  batch_big = {
      'speech': {'features': _pad(feats, 64, rng), 'feature_paddings': _paddings(mel_lengths, 64)},
      'text': {'ids': _pad(ids, 30, rng), 'id_paddings': _paddings(text_lengths, 30)},
      'paired': {'features': _pad(feats, 64, rng), 'feature_paddings': _paddings(mel_lengths, 64),
                 'ids': _pad(ids[:, :12], 16, rng), 'id_paddings': _paddings([12, 9], 16)},
  }
  # Garbage inside the padding of the shorter examples as well.
  batch_big['speech']['features'][1, 22:40] = rng.normal(size=(18, 80)) * 50
  batch_big['text']['ids'][1, 9:20] = 17
  batch_big['paired']['ids'][1, 9:12] = 11
  params = _init(mc, lc, batch_small)
  frames = [-(-n // 4) for n in mel_lengths]

  def masks_for(batch):
    # Same masks on valid positions for both paddings: mask every 3rd position.
    def every_third(length, pad_len):
      m = (np.arange(pad_len) % 3 == 0)[None].repeat(2, 0)
      return m & (np.arange(pad_len)[None] < np.asarray(length)[:, None])
    t_speech = batch['speech']['feature_paddings'].shape[1] // 4
    return {'speech': every_third(frames, t_speech),
            'text': every_third(text_lengths, batch['text']['ids'].shape[1]),
            'paired_speech': every_third(frames, t_speech),
            'paired_text': every_third([12, 9], batch['paired']['ids'].shape[1]),
            'negatives': None}

  apply = jax.jit(MSLAM(mc).apply)
  out_s = apply(params, batch_small, masks_for(batch_small), 1.0)
  out_b = apply(params, batch_big, masks_for(batch_big), 1.0)
  checks = [('speech', k, frames) for k in ('context', 'quantized', 'code_logits',
                                            'code_pred_logits', 'code_ids')]
  checks += [('text', 'char_logits', text_lengths)]
  checks += [('paired', k, frames) for k in ('tlm_code_logits', 'ctc_logits', 'code_ids')]
  checks += [('paired', 'tlm_char_logits', [12, 9])]
  for part, key, lengths in checks:
    for b, n in enumerate(lengths):
      np.testing.assert_allclose(out_b[part][key][b, :n], out_s[part][key][b, :n],
                                 rtol=5e-4, atol=5e-4, err_msg=f'{part}/{key} example {b}')


def test_pack_speech_text_leaves_no_gap():
  speech = jnp.arange(1, 7, dtype=jnp.float32).reshape(1, 6, 1).repeat(2, 0)
  text = -jnp.arange(1, 5, dtype=jnp.float32).reshape(1, 4, 1).repeat(2, 0)
  sp = jnp.asarray(_paddings([6, 3], 6))
  tp = jnp.asarray(_paddings([2, 4], 4))
  joint, joint_pad, pos = pack_speech_text(speech, sp, text, tp)
  np.testing.assert_array_equal(joint[0, :, 0], [1, 2, 3, 4, 5, 6, -1, -2, 0, 0])
  np.testing.assert_array_equal(joint[1, :, 0], [1, 2, 3, -1, -2, -3, -4, 0, 0, 0])
  np.testing.assert_array_equal(joint_pad[1], [0] * 7 + [1] * 3)
  np.testing.assert_array_equal(pos, [[6, 7, 8, 9], [3, 4, 5, 6]])


def test_every_parameter_has_logical_axis_names(tiny):
  mc, lc = tiny
  abstract = jax.eval_shape(lambda: _init(mc, lc, small_batch()))
  boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert boxed
  for leaf in boxed:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim
    assert all(isinstance(n, str) for n in leaf.names), leaf.names
  flat = jax.tree_util.tree_flatten_with_path(
      abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  for path, leaf in flat:
    keys = jax.tree_util.keystr(path)
    if 'speech_layers' in keys or 'shared_layers' in keys:
      assert leaf.names[0] == 'layers', keys


def test_remat_policies_unrolling_and_wgrad_layout_give_the_same_loss_and_gradients(tiny):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from mslam_jax.models.conformer import ConformerStack  # pylint: disable=g-import-not-at-top
  mc, _ = tiny
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 8, mc.d_model)), jnp.float32)
  paddings = jnp.asarray(_paddings([8, 5], 8))
  params = ConformerStack(mc, 2).init(jax.random.key(0), x, paddings)
  results = {}
  for policy in REMAT_POLICIES:  # every entry of the one table
    stack = ConformerStack(dataclasses.replace(mc, remat_policy=policy), 2)
    loss = lambda p, s=stack: jnp.sum(s.apply(p, x, paddings) ** 2)
    results[policy] = jax.jit(jax.value_and_grad(loss))(params)
  # Unrolling the scan changes the program, not the parameters or the maths.
  for policy in ('none', 'dots_no_batch'):
    stack = ConformerStack(dataclasses.replace(mc, remat_policy=policy, scan_unroll=2), 2)
    loss = lambda p, s=stack: jnp.sum(s.apply(p, x, paddings) ** 2)
    results[f'{policy}, unrolled'] = jax.jit(jax.value_and_grad(loss))(params)
  # So does taking the widening layers' weight gradient from a written-out x^T.
  for policy in ('none', 'dots_no_batch'):
    stack = ConformerStack(
        dataclasses.replace(mc, remat_policy=policy, transposed_weight_gradient=True), 2)
    loss = lambda p, s=stack: jnp.sum(s.apply(p, x, paddings) ** 2)
    results[f'{policy}, transposed weight gradient'] = jax.jit(jax.value_and_grad(loss))(params)
  # And the narrowing layers' (feed-forward wo) taken as (dy^T x)^T.
  stack = ConformerStack(dataclasses.replace(mc, flipped_weight_gradient=True), 2)
  loss = lambda p, s=stack: jnp.sum(s.apply(p, x, paddings) ** 2)
  results['none, flipped weight gradient'] = jax.jit(jax.value_and_grad(loss))(params)
  for key in set(results) - {'none'}:
    np.testing.assert_allclose(results[key][0], results['none'][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[key][1]), jax.tree.leaves(results['none'][1])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_frontend_shape_arithmetic_matches_the_layer(tiny):
  """frontend.output_frames / conv_output_shapes (what flops.py reads) against ConvSubsampling."""
  from mslam_jax.models import frontend  # pylint: disable=g-import-not-at-top
  mc, _ = tiny
  for frames in (1, 7, 8, 9, 48):
    x, p = jnp.zeros((1, frames, mc.num_mel_bins)), jnp.zeros((1, frames))
    (out, paddings), variables = jax.eval_shape(
        lambda x, p: frontend.ConvSubsampling(mc).init_with_output(jax.random.key(0), x, p),
        x, p)
    time_len, freq, _, channels = frontend.conv_output_shapes(mc, frames)[-1]
    assert out.shape[1] == paddings.shape[1] == time_len == frontend.output_frames(frames)
    assert time_len == -(-frames // 4)  # two stride-2 convs, counted by hand
    kernel = nn.unbox(variables)['params']['projection']['kernel']
    assert kernel.shape == (freq * channels, mc.d_model)


def test_merged_passes_give_the_same_loss_and_gradients_with_one_pass_per_length(tiny):
  """ModelConfig.merge_passes against separate passes, on a batch whose lengths line up.

  Speech and paired speech have the same frames, and the packed TLM sequence
  (12 frames + 12 characters) is as long as the text, so merged, the speech
  layers run once (speech, TLM, CTC) and the shared layers twice (12 frames:
  speech and CTC; 24: text and TLM) instead of three and four times.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  from mslam_jax.models.conformer import ConformerStack  # pylint: disable=g-import-not-at-top
  mc, lc = tiny
  config = dataclasses.replace(SMALL_BATCH, paired_text_length=12)
  batch = small_batch(config=config)
  params = _init(mc, lc, batch)
  results, calls = {}, {}
  for merge in (False, True):
    model_config = dataclasses.replace(mc, merge_passes=merge)
    stacks = []

    def count_stacks(next_fun, args, kwargs, context, stacks=stacks):
      if isinstance(context.module, ConformerStack) and context.method_name == '__call__':
        stacks.append((context.module.name, args[0].shape))
      return next_fun(*args, **kwargs)

    def loss(p, model_config=model_config, stacks=stacks):
      with nn.intercept_methods(count_stacks):
        return pretrain_loss.pretrain_loss(p, batch, jax.random.key(2), 3,
                                           model_config=model_config, loss_config=lc)
    results[merge] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    calls[merge] = sorted(stacks)
  frames, rows = 12, SMALL_BATCH.speech_batch_size
  assert calls[False] == sorted([('speech_layers', (rows, frames, mc.d_model))] * 3
                                + [('shared_layers', (rows, frames, mc.d_model))] * 2
                                + [('shared_layers', (rows, 24, mc.d_model))] * 2)
  assert calls[True] == [('shared_layers', (2 * rows, frames, mc.d_model)),
                         ('shared_layers', (2 * rows, 24, mc.d_model)),
                         ('speech_layers', (3 * rows, frames, mc.d_model))]
  (loss_sep, metrics_sep), grads_sep = results[False]
  (loss_merged, metrics_merged), grads_merged = results[True]
  np.testing.assert_allclose(loss_merged, loss_sep, rtol=1e-5)
  for key in metrics_sep:
    np.testing.assert_allclose(metrics_merged[key], metrics_sep[key], rtol=1e-4, atol=1e-6,
                               err_msg=key)
  # Gradients to within float rounding of the largest: some (the attention key
  # bias's, which softmax cancels) are rounding noise around zero either way, and
  # how much depends on the CPU's vector width (1.1e-6 of the largest on an
  # AVX2-only machine, under 1e-6 with AVX-512); a wrong merge is off by far more.
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads_sep))
  for a, b in zip(jax.tree.leaves(grads_merged), jax.tree.leaves(grads_sep)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_bfloat16_compute_gives_the_float32_loss_within_bf16_rounding(tiny):
  """ModelConfig.dtype = 'bfloat16' (the TPU/GPU setting) through every path and its gradients."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  mc, lc = tiny
  batch = small_batch()
  params = _init(mc, lc, batch)
  results = {}
  for dtype in ('float32', 'bfloat16'):
    model_config = dataclasses.replace(mc, dtype=dtype)
    loss = lambda p, model_config=model_config: pretrain_loss.pretrain_loss(
        p, batch, jax.random.key(2), 3, model_config=model_config, loss_config=lc,
        deterministic=True)
    results[dtype] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  (loss32, _), grads32 = results['float32']
  (loss16, _), grads16 = results['bfloat16']
  # bf16 keeps 8 bits of mantissa: the loss agrees to about 1%.
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
  for g16, g32 in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads32)):
    assert g16.dtype == jnp.float32  # parameters (and so gradients) stay float32
    assert np.all(np.isfinite(g16))


@pytest.mark.parametrize('field, value', [
    ('num_heads', 7), ('conv_groups', 5), ('conv_kernel_size', 4), ('remat_policy', 'no_such_policy'),
    ('scan_unroll', 0), ('dtype', 'float16'), ('transposed_weight_gradient', 'yes'),
    ('flipped_weight_gradient', 'no'), ('cpu_bf16_products', 'maybe')])
def test_model_config_rejects_bad_values_by_name(field, value):
  with pytest.raises(ValueError, match=f'ModelConfig: .*{field}='):
    ModelConfig(**{field: value})


_BF16_LINE = ("CPU bf16 products: the Conformer's dense layers and attention accumulate in "
              'float32 ')


@pytest.mark.parametrize('avx512, d_model, dtype, settings, expected', [
    # AVX-512 host: the feed-forward wo flipped; AVX2-only: wi and pointwise_in transposed.
    (True, 256, 'float32', {}, "CPU weight gradients: feed-forward wo as (dy^T x)^T "
     "(flipped_weight_gradient='auto')"),
    (False, 256, 'float32', {}, 'CPU weight gradients: feed-forward wi and convolution '
     "pointwise_in from a written-out x^T (transposed_weight_gradient='auto')"),
    (True, 64, 'float32', {}, None),        # the tiny demo's width
    (True, 256, 'float32', {'flipped_weight_gradient': False}, None),
    (True, 64, 'float32', {'transposed_weight_gradient': True, 'flipped_weight_gradient': True},
     'CPU weight gradients: feed-forward wi and convolution pointwise_in from a written-out x^T '
     '(transposed_weight_gradient=True); feed-forward wo as (dy^T x)^T '
     '(flipped_weight_gradient=True)'),
    # bf16: every dense layer's products with float32 accumulation on an AVX-512 BF16 host.
    (True, 256, 'bfloat16', {}, _BF16_LINE + "(cpu_bf16_products='auto')"),
    (False, 64, 'bfloat16', {}, None),
    (False, 64, 'bfloat16', {'cpu_bf16_products': True}, _BF16_LINE + '(cpu_bf16_products=True)'),
    (True, 256, 'bfloat16', {'cpu_bf16_products': False}, None),
])
def test_the_cpu_products_line_names_what_the_cpu_program_does(monkeypatch, avx512, d_model,
                                                               dtype, settings, expected):
  """conformer.cpu_product_forms against the barriers in the stack's CPU gradient:
  one per written-out x^T (2 feed-forward wi + 1 pointwise_in) and per flipped wo (2);
  with bf16 products, one per written-out transpose of a weight gradient's smaller
  operand (10 layers) and one more on each wo's flipped result (2), and the attention's
  ten written-out transposes (q, k, v and the output forward; six in the backward)."""
  from mslam_jax.models import conformer  # pylint: disable=g-import-not-at-top
  from mslam_jax.models import layers  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(layers.host_cpu, 'has_avx512', lambda: avx512)
  monkeypatch.setattr(layers.host_cpu, 'has_avx512_bf16', lambda: avx512)
  monkeypatch.setattr(layers.host_cpu, 'avx2_without_avx512', lambda: not avx512)
  mc = ModelConfig(d_model=d_model, num_heads=4, ffn_dim=4 * d_model, conv_groups=4,
                   dtype=dtype, dropout_rate=0.0, **settings)
  line = conformer.cpu_product_forms(mc)
  assert line == expected
  if line and line.startswith('CPU bf16'):
    line = 'bf16'
  stack = conformer.ConformerStack(mc, 1)
  x, paddings = jnp.ones((1, 4, d_model), mc.compute_dtype), jnp.zeros((1, 4))
  params = jax.eval_shape(stack.init, jax.random.key(0), x, paddings)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(stack.apply(p, x, paddings))))
  barriers = jax.export.export(grad, platforms=('cpu',))(params).mlir_module().count(
      'stablehlo.optimization_barrier')
  assert barriers == ((3 if 'x^T (' in (line or '') else 0) + (2 if 'wo as' in (line or '') else 0)
                      + (12 + 10 if line == 'bf16' else 0))
