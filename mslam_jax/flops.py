"""Analytical FLOPs of one mSLAM pre-training step, and MFU against a measured peak.

XLA's `compiled.cost_analysis()['flops']` counts the body of a loop once, and
both Conformer stacks run under `nn.scan`, so it undercounts by about the
number of layers; MFU needs an explicit count. This module counts the FLOPs
the hardware executes on the padded static shapes of a `BatchConfig`:

  * every matmul / einsum / convolution as 2 * m * n * k (one multiply and
    one add per multiply-accumulate), biases and elementwise ops left out:
    layer norms, GroupNorm, activations (swish, GLU's gate product, relu),
    softmax, dropout, masking, the Gumbel noise, the residual adds, the
    losses' log-softmax and the CTC forward recursion. At the tiny test sizes
    these make up a few per cent of what XLA counts (tests/test_flops.py);
  * attention scores Q K^T and the weighted sum A V over the padded length;
  * the depthwise convolution as 2 * kernel * channels per frame (written as
    K shifted multiply-adds in `layers.depthwise_conv1d`);
  * the contrastive similarities as one [T', code_dim] x [code_dim, T']
    matmul per utterance, 2 * T'^2 * code_dim (`losses/contrastive.py` scores
    every frame against every target and gathers the K + 1 it needs).

Forward passes of one step (`mslam_jax.models.mslam`, `mslam_jax.pretrain_loss`):

  speech:     frontend -> quantizer (logits + softmax @ codebook) on the unmasked
              features; N speech layers -> context projection + contrastive
              similarity; M shared layers -> code head.
  text:       embedding (a gather: 0 FLOPs) -> M shared layers -> char head.
  paired_tlm: frontend -> quantizer logits (the quantized vectors are unused
              and removed by XLA); N speech layers on the masked features;
              M shared layers on [speech ; text] of length T' + L -> code head
              on the speech half, char head on the text half.
  paired_ctc: N speech layers and M shared layers again on the unmasked
              features -> CTC head -> optax.ctc_loss, whose label gather is an
              einsum with one-hot labels. The paired frontend runs once per
              step and is counted under paired_tlm when TLM is on, else here.

`train_step_flops` is the numerator of `mfu`; `measure_peak_flops` gives the
denominator on the machine at hand.
"""

import functools
import math
import statistics
import time
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp

from mslam_jax.data.batch_spec import BatchConfig
from mslam_jax.models import frontend
from mslam_jax.models.config import REMAT_POLICIES, ModelConfig
from mslam_jax.pretrain_loss import LossConfig

# The forward passes of one step, the keys of `forward_flops` besides 'total'.
PARTS = ('speech', 'text', 'paired_tlm', 'paired_ctc')


def _matmul(m: int, k: int, n: int) -> int:
  """FLOPs of an [m, k] x [k, n] product: one multiply and one add per term."""
  return 2 * m * k * n


def conformer_layer_flops(config: ModelConfig, batch: int, length: int) -> Dict[str, int]:
  """Forward FLOPs of one ConformerBlock on [batch, length, d] (`models/conformer.py`).

  Args:
    config: the architecture; uses d_model, ffn_dim, num_heads (only through
      d = heads * head_dim) and conv_kernel_size.
    batch: sequences B.
    length: padded length T (every position is computed, padded or not).

  Returns:
    FLOPs by component, and their 'total':
      ffn: both half-step feed-forwards, each d -> ffn -> d: 2 * 2 * 2BTdf.
      attention_projections: query, key, value and output, each 2BTd^2.
      attention_scores: Q K^T and A V, each 2BT^2 d (summed over heads).
      conv_pointwise: the convolution module's d -> 2d and d -> d: 6BTd^2.
      depthwise_conv: 2 * kernel * d per frame: 2BTKd.
  """
  d, f, k = config.d_model, config.ffn_dim, config.conv_kernel_size
  tokens = batch * length
  components = {
      'ffn': 2 * (_matmul(tokens, d, f) + _matmul(tokens, f, d)),
      'attention_projections': 4 * _matmul(tokens, d, d),
      'attention_scores': 2 * batch * _matmul(length, d, length),
      'conv_pointwise': _matmul(tokens, d, 2 * d) + _matmul(tokens, d, d),
      'depthwise_conv': 2 * tokens * k * d,
  }
  components['total'] = sum(components.values())
  return components


def frontend_flops(config: ModelConfig, batch: int, frames: int) -> Dict[str, int]:
  """Forward FLOPs of `ConvSubsampling` on log-mel [batch, frames, num_mel_bins].

  The shapes come from the frontend itself (`frontend.conv_output_shapes`):
  conv i maps [B, T_i, F_i, C_in] to [B, ceil(T_i/2), ceil(F_i/2), C] with
  2 * k * k * C_in FLOPs per output element (k = frontend.CONV_KERNEL; C_in =
  1, then C = frontend_channels); the projection maps the last layer's F * C
  to d for each of its ceil(T/4) output frames.

  Returns:
    {'conv': both Conv2D layers, 'projection': the linear map to d, 'total'}.
  """
  kernel_area = frontend.CONV_KERNEL ** 2
  shapes = frontend.conv_output_shapes(config, frames)
  conv = sum(2 * batch * time_len * freq * channels_out * kernel_area * channels_in
             for time_len, freq, channels_in, channels_out in shapes)
  time_len, freq, _, channels_out = shapes[-1]
  projection = _matmul(batch * time_len, freq * channels_out, config.d_model)
  return {'conv': conv, 'projection': projection, 'total': conv + projection}


def _add_frontend(detail: Dict[str, int], config: ModelConfig, batch: int, frames: int):
  front = frontend_flops(config, batch, frames)
  detail['frontend_conv'] = front['conv']
  detail['frontend_projection'] = front['projection']


_STACKS = ('speech_layers', 'shared_layers')


def _add_stack(detail: Dict[str, int], config: ModelConfig, stack: str, num_layers: int,
               batch: int, length: int):
  """Adds `num_layers` ConformerBlocks on [batch, length] to `detail` as 'stack.component'."""
  layer = conformer_layer_flops(config, batch, length)
  for component, value in layer.items():
    if component != 'total':
      key = f'{stack}.{component}'
      detail[key] = detail.get(key, 0) + num_layers * value


def forward_flops_detail(model_config: ModelConfig, batch_config: BatchConfig,
                         loss_config: LossConfig) -> Dict[str, Dict[str, int]]:
  """Forward FLOPs of one global batch, per part and per component.

  Args:
    model_config: the architecture.
    batch_config: global batch sizes and padded lengths per data kind.
    loss_config: which kinds are on (use_speech / use_text / use_paired) and
      which paired passes run (a zero tlm_weight or ctc_weight skips that pass).

  Returns:
    {part: {component: FLOPs}} for the enabled parts among PARTS. Components:
      frontend_conv, frontend_projection: `frontend_flops`.
      quantizer_logits, quantizer_codebook: d -> num_codes logits, and the
        straight-through softmax [.., num_codes] @ codebook [num_codes, code_dim].
      context_projection: d -> code_dim on the N-layer output.
      contrastive_similarity: 2 T' code_dim per frame (all-pairs cosines).
      code_head, char_head, ctc_head: d -> num_codes / vocab / vocab.
      ctc_label_gather: optax.ctc_loss reads each label's log-probability with
        an einsum of log-probs [B, T', vocab] and one-hot labels [B, L, vocab].
      'speech_layers.X', 'shared_layers.X': the components X of
        `conformer_layer_flops`, summed over layers and passes.
    Shapes: B, T (log-mel frames), L from `batch_config`; T' = ceil(T / 4).
  """
  cfg = model_config
  d, codes, code_dim, vocab = cfg.d_model, cfg.num_codes, cfg.code_dim, cfg.vocab_size
  n_speech, n_shared = cfg.num_speech_layers, cfg.num_shared_layers
  detail = {}

  if loss_config.use_speech:
    frames = batch_config.speech_frames
    b, t = batch_config.speech_batch_size, frontend.output_frames(frames)
    part = {
        'quantizer_logits': _matmul(b * t, d, codes),
        'quantizer_codebook': _matmul(b * t, codes, code_dim),
        'context_projection': _matmul(b * t, d, code_dim),
        'contrastive_similarity': b * _matmul(t, code_dim, t),
        'code_head': _matmul(b * t, d, codes),
    }
    _add_frontend(part, cfg, b, frames)
    _add_stack(part, cfg, 'speech_layers', n_speech, b, t)
    _add_stack(part, cfg, 'shared_layers', n_shared, b, t)
    detail['speech'] = part

  if loss_config.use_text:
    b, length = batch_config.text_batch_size, batch_config.text_length
    part = {'char_head': _matmul(b * length, d, vocab)}
    _add_stack(part, cfg, 'shared_layers', n_shared, b, length)
    detail['text'] = part

  if loss_config.use_paired:
    frames = batch_config.paired_frames
    b, t = batch_config.paired_batch_size, frontend.output_frames(frames)
    length = batch_config.paired_text_length
    tlm, ctc = bool(loss_config.tlm_weight), bool(loss_config.ctc_weight)
    if tlm:
      # Only the code ids of the quantizer are used here: XLA removes the
      # codebook product as dead code.
      part = {
          'quantizer_logits': _matmul(b * t, d, codes),
          'code_head': _matmul(b * t, d, codes),
          'char_head': _matmul(b * length, d, vocab),
      }
      _add_frontend(part, cfg, b, frames)
      _add_stack(part, cfg, 'speech_layers', n_speech, b, t)
      _add_stack(part, cfg, 'shared_layers', n_shared, b, t + length)
      detail['paired_tlm'] = part
    if ctc:
      part = {
          'ctc_head': _matmul(b * t, d, vocab),
          'ctc_label_gather': 2 * b * t * vocab * length,
      }
      if not tlm:
        _add_frontend(part, cfg, b, frames)
      _add_stack(part, cfg, 'speech_layers', n_speech, b, t)
      _add_stack(part, cfg, 'shared_layers', n_shared, b, t)
      detail['paired_ctc'] = part
  return detail


def _by_part(values: Dict[str, int]) -> Dict[str, int]:
  out = {part: values.get(part, 0) for part in PARTS}
  out['total'] = sum(out.values())
  return out


def forward_flops(model_config: ModelConfig, batch_config: BatchConfig,
                  loss_config: LossConfig) -> Dict[str, int]:
  """Forward FLOPs of one global batch, per part.

  Arguments as for `forward_flops_detail`. Returns {'speech', 'text',
  'paired_tlm', 'paired_ctc', 'total'} as Python ints, 0 for a part that is
  switched off. Counting rules: see the module docstring.
  """
  detail = forward_flops_detail(model_config, batch_config, loss_config)
  return _by_part({part: sum(c.values()) for part, c in detail.items()})


def remat_flops(model_config: ModelConfig, batch_config: BatchConfig,
                loss_config: LossConfig) -> Dict[str, int]:
  """Forward FLOPs that rematerialisation repeats in the backward pass, per part.

  The Conformer components that `ModelConfig.remat_policy`'s entry of
  `models.config.REMAT_POLICIES` lists as `recomputed` (that table says what
  each policy saves), summed over both stacks and every pass; 'full' adds
  the stacks' whole forward once more. This is what the traced program asks
  for (tests/test_flops.py checks it on the jaxpr). With a single layer per
  stack XLA may merge the recomputation with the forward and run less. The
  frontend, quantizer and heads sit outside the rematerialised scan and are
  never recomputed. Returns the same keys as `forward_flops`.
  """
  recomputed = REMAT_POLICIES[model_config.remat_policy].recomputed
  detail = forward_flops_detail(model_config, batch_config, loss_config)
  return _by_part({
      part: sum(components.get(f'{stack}.{c}', 0) for stack in _STACKS for c in recomputed)
      for part, components in detail.items()})


def train_step_flops(model_config: ModelConfig, batch_config: BatchConfig,
                     loss_config: LossConfig) -> Dict[str, int]:
  """FLOPs of one training step (forward, backward, rematerialisation), per part.

  The backward pass of y = x W costs two matmuls of the forward's size
  (dx = dy W^T and dW = x^T dy), so forward + backward = 3x forward. That
  rule slightly overcounts what runs: no gradient is formed for the log-mel
  input of the first frontend conv, for the one-hot labels of the CTC label
  gather, for the codebook in the quantizer's soft product (it learns
  through the gathered rows), or anywhere through the TLM quantizer logits
  (used only via argmax); together well under 0.1% of the step for the 0.6B
  model.
  Rematerialisation adds `remat_flops`; the optimizer update (elementwise
  over the parameters) is left out. Returns the same keys as `forward_flops`.
  """
  forward = forward_flops(model_config, batch_config, loss_config)
  remat = remat_flops(model_config, batch_config, loss_config)
  return {key: 3 * forward[key] + remat[key] for key in forward}


def mfu(step_flops: float, step_time_s: float, num_devices: int,
        peak_flops_per_device: float) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices."""
  if step_time_s <= 0 or num_devices <= 0 or peak_flops_per_device <= 0:
    raise ValueError(
        f'mfu: step_time_s={step_time_s}, num_devices={num_devices} and '
        f'peak_flops_per_device={peak_flops_per_device} must all be positive.')
  return step_flops / (step_time_s * num_devices * peak_flops_per_device)


# The side of the square product `measure_peak_flops` times by default (ours):
# 2048 on the CPU (about 0.1 s per fp32 product on 2 cores), 8192 on an
# accelerator, large enough to keep its matrix units busy (an H200 in bf16 ran
# 683-794 TFLOP/s at n = 4096-16384; benchmarks/RESULTS.md, "On an NVIDIA H200").
PEAK_SIZE_CPU = 2048
PEAK_SIZE_ACCELERATOR = 8192
# With calls=None each timing runs products back to back for at least this long
# (ours), so that the launch and the host's wait are a small part of it.
PEAK_MIN_SECONDS = 0.05


def products_per_timing(seconds_per_product: float, min_seconds: float = PEAK_MIN_SECONDS) -> int:
  """How many back-to-back products make a timing of at least `min_seconds` (at least 1)."""
  return max(1, math.ceil(min_seconds / max(seconds_per_product, 1e-9)))


def seconds_per_call(fn: Callable, *args, calls: Optional[int] = None) -> float:
  """Seconds per call of fn(*args), from `calls` back-to-back calls waited for once.

  jax dispatches asynchronously, so one wait at the end keeps the launch and
  the host's wait out of each call's time. None first times one call and runs
  enough for PEAK_MIN_SECONDS (`products_per_timing`).
  """
  if calls is None:
    calls = products_per_timing(seconds_per_call(fn, *args, calls=1))
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def measure_peak_flops(dtype=jnp.float32, n: Optional[int] = None, *, repeats: int = 5,
                       calls: Optional[int] = None) -> float:
  """Measured matmul FLOP/s of the default device: the MFU denominator.

  Times a jitted [n, n] x [n, n] product (2 n^3 FLOPs) of `dtype` operands,
  accumulated in float32 as the model's bf16 products are (on a CPU with
  AVX-512 BF16, XLA:CPU runs a bf16 product with a bf16 result through
  float32 at half that rate: benchmarks/RESULTS.md), after one warm-up
  call (compilation and first-touch allocation) and returns 2 n^3 over the
  median of `repeats` timings: a peak measured on the machine at hand,
  since machines of one kind differ (AVX2 or AVX-512, load). `n` defaults to
  PEAK_SIZE_CPU on the CPU, PEAK_SIZE_ACCELERATOR on GPU and TPU. Each
  timing runs `calls` products back to back and waits once, so that on an
  accelerator, where one product takes about a millisecond, the launch and
  the host's wait are not counted as the product's time; None times one
  product first and runs enough for PEAK_MIN_SECONDS (one on a CPU at n = 2048).
  """
  if n is None:
    n = PEAK_SIZE_CPU if jax.default_backend() == 'cpu' else PEAK_SIZE_ACCELERATOR
  if repeats < 1 or (calls is not None and calls < 1):
    raise ValueError(f'measure_peak_flops: repeats={repeats} and calls={calls} must be at '
                     'least 1.')
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
  matmul(a, b).block_until_ready()
  if calls is None:
    calls = products_per_timing(seconds_per_call(matmul, a, b, calls=1))
  times = [seconds_per_call(matmul, a, b, calls=calls) for _ in range(repeats)]
  return 2.0 * n ** 3 / statistics.median(times)
