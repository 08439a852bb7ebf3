"""Architecture hyper-parameters of the mSLAM encoder, bound from gin.

Every field is a gin parameter (`ModelConfig.d_model = 1024`); the size files
`gin/models/mslam_0.6b.gin`, `gin/models/mslam_2b.gin` and `gin/models/tiny.gin`
set them. Defaults are the 0.6B model of mSLAM (Bapna et al. 2022, arXiv:2202.01374);
values marked (inferred) are our reading where the papers are silent.
"""

import dataclasses
from typing import Callable, Optional, Tuple, Union

import gin
import jax
import jax.numpy as jnp

from mslam_jax.data.batch_spec import NUM_MEL_BINS


@dataclasses.dataclass(frozen=True)
class RematPolicy:
  """One named rematerialisation policy of the scanned Conformer stacks.

  Attributes:
    policy: the `jax.checkpoint_policies` entry `nn.remat` gets for each
      scanned ConformerBlock (`models/conformer.py`); None runs without remat.
    recomputed: the ConformerBlock operations whose forward FLOPs the backward
      pass runs again, named as the components `flops.conformer_layer_flops`
      returns; `flops.remat_flops` counts them, and tests/test_flops.py checks
      them against the traced program.
  """
  policy: Optional[Callable]
  recomputed: Tuple[str, ...]


# The one table of remat policies: ModelConfig.remat_policy takes a key,
# `ConformerStack` applies its policy and `flops.remat_flops` counts what it
# recomputes. Compile time and memory of the 2B model depend on this choice.
REMAT_POLICIES = {
    # Saves every activation the backward needs: most memory, no recompute.
    'none': RematPolicy(None, ()),
    # Saves only each layer's input; the whole layer runs again (+1x forward).
    'full': RematPolicy(
        jax.checkpoint_policies.nothing_saveable,
        ('ffn', 'attention_projections', 'attention_scores', 'conv_pointwise',
         'depthwise_conv')),
    # Saves every dot_general output, Q K^T and A V included; of the counted
    # ops only the depthwise convolution (shifted multiply-adds) runs again.
    'dots': RematPolicy(jax.checkpoint_policies.checkpoint_dots, ('depthwise_conv',)),
    # Saves the weight matmuls (no batch dimension); Q K^T and A V have batch
    # and head as batch dimensions, so they run again, as does the depthwise
    # convolution.
    'dots_no_batch': RematPolicy(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        ('attention_scores', 'depthwise_conv')),
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and switches of the mSLAM encoder and its pre-training heads.

  Attributes:
    num_mel_bins: input log-mel channels (paper: 80-dim log-mel); sizes the
      frontend's projection. Bound with BatchConfig's and FeatureConfig's from
      the gin macro NUM_MEL_BINS (data/batch_spec.py says why there are three).
    frontend_channels: channels of both stride-2 Conv2D layers (inferred: 128,
      the Conformer/w2v-BERT subsampling convention).
    d_model: model dim d (paper: 1024 for 0.6B, 1408 for 2B).
    num_speech_layers: speech-only Conformer layers N (paper: 8).
    num_shared_layers: shared Conformer layers M (paper: 16 for 0.6B, 32 for 2B).
    num_heads: attention heads (paper: 8; 2B inferred 8).
    ffn_dim: hidden width of each feed-forward module (paper: 4096; 2B 4 x d).
    conv_kernel_size: depthwise convolution width (paper: 5).
    conv_groups: GroupNorm groups in the convolution module (inferred: 32;
      SLAM replaced BatchNorm by GroupNorm without giving the group count).
    dropout_rate: dropout on residual branches and attention (inferred: 0.1).
    vocab_size: character vocabulary incl. reserved ids (paper: 4096).
    max_text_length: longest text in characters (paper: 512); sizes the
      sinusoidal position table.
    num_codes: quantizer codebook size (paper: 1 codebook x 1024 codes).
    code_dim: quantizer code vector dim (paper: 1024).
    remat_policy: a key of REMAT_POLICIES (above, with what each saves and
      recomputes), applied to each scanned layer.
    dtype: compute dtype name ('float32' or 'bfloat16'); params stay float32.
    scan_unroll: Conformer layers per iteration of each stack's scan loop
      (ours; `nn.scan(unroll=...)`). 1 compiles one layer body per stack, the
      fastest compile and the usual choice on TPU; unrolling all layers (any
      value >= the layer count) lets XLA:CPU drop the loop's per-layer copies
      of saved activations and parameters: on the 2-core CPU the
      d=256 step was about 20% faster fully unrolled (benchmarks/RESULTS.md),
      so the CPU gin files unroll. On an H200 the 0.6B stack's bf16 step was
      1.16x faster fully unrolled, for a 194 s compile against 10 s.
    merge_passes: run the inputs of a stack (or frontend, text embedding,
      head) that have the same shape as one batch (ours; `mslam_jax.models.passes`):
      the TLM and CTC passes of the paired speech always share the speech
      layers, and parts of equal length share more (in the tiny CPU demo,
      every stack runs once per length). Same outputs and FLOPs, fewer
      compiled programs (the demo's compile about 30% shorter); on a 2-core
      CPU the step is 6-12% slower, since separate passes run side by side
      there. False runs every pass on its own (the reference the tests
      compare with).
    transposed_weight_gradient: the Conformer's widening dense layers (the
      feed-forward's wi, d -> ffn, and the convolution module's pointwise_in,
      d -> 2d) take their kernel gradient from a written-out copy of their input's
      transpose (ours; `layers.matmul_transposed_weight_gradient`). For
      AVX2-only CPUs, where XLA:CPU ran autodiff's x^T dy for the 0.6B width's
      feed-forward wi at about half its matmul rate (79 against 144-154
      GFLOP/s): the stack step 1.01-1.14x faster there at d 256 and 1024, the
      tiny demo model's (d 64) 1.19x slower (benchmarks/RESULTS.md).
      'auto' (the default) does it where it was measured to pay: fp32 layers
      of d_model 256 and up, in programs compiled for the CPU backend of an
      x86 host with AVX2 and no AVX-512 (`layers.AUTO_TRANSPOSED_MIN_WIDTH`,
      `mslam_jax.host_cpu`). True does it everywhere, False nowhere. Off for
      TPU and GPU programs, where the compiler lays out the operands itself
      and the copy's barrier would stop fusion, and on AVX-512 CPUs, where
      these products already ran near the matmul rate.
    flipped_weight_gradient: the Conformer's narrowing dense layer (the
      feed-forward's wo, ffn -> d) takes its kernel gradient as (dy^T x)^T
      instead of x^T dy (ours; `layers.matmul_flipped_weight_gradient`): the
      same product with its output the other way round, [d, ffn] instead of
      [ffn, d], which XLA:CPU ran 1.11-1.39x faster alone at d 256 on an
      AVX-512 CPU (level at the 0.6B width): the stack step 1.02-1.03x faster
      at d 256 and 1,600 frames, level at d 1024 (benchmarks/RESULTS.md).
      'auto' (the default) does it for fp32 layers with d_model 256 and up,
      in programs compiled for the CPU backend of an x86 host with AVX-512;
      not on AVX2-only CPUs, where it was not measured, nor for the tiny demo
      model, nor in TPU and GPU programs. True does it everywhere, False
      nowhere.
    cpu_bf16_products: for bfloat16 models, the Conformer's dense layers
      multiply bf16 operands into a float32 result, add the bias in float32
      and round to bf16 once, and take their gradients the same way, and so do
      the attention's six products (ours; `layers.affine_float32_accumulation`,
      `layers.attention_float32_accumulation`). XLA:CPU runs such a product with
      the CPU's AVX-512 BF16 instructions at about twice its float32 rate,
      while it converts the operands of nn.Dense's bf16 -> bf16 product to
      float32: the bf16 stack step 1.75-1.94x faster on a 2-core AMD EPYC with
      AVX-512 BF16 (benchmarks/RESULTS.md). 'auto' (the default) does it in
      programs compiled for the CPU backend of a host with AVX-512 BF16
      (`mslam_jax.host_cpu`); True does it in every program, False nowhere.
      Where it applies, the two weight-gradient options above do not.
      float32 models are unaffected.
  """
  num_mel_bins: int = NUM_MEL_BINS
  frontend_channels: int = 128
  d_model: int = 1024
  num_speech_layers: int = 8
  num_shared_layers: int = 16
  num_heads: int = 8
  ffn_dim: int = 4096
  conv_kernel_size: int = 5
  conv_groups: int = 32
  dropout_rate: float = 0.1
  vocab_size: int = 4096
  max_text_length: int = 512
  num_codes: int = 1024
  code_dim: int = 1024
  remat_policy: str = 'none'
  dtype: str = 'float32'
  scan_unroll: int = 1
  merge_passes: bool = True
  transposed_weight_gradient: Union[bool, str] = 'auto'
  flipped_weight_gradient: Union[bool, str] = 'auto'
  cpu_bf16_products: Union[bool, str] = 'auto'

  def __post_init__(self):
    if self.d_model % self.num_heads:
      raise ValueError(
          f'ModelConfig: d_model={self.d_model} is not divisible by '
          f'num_heads={self.num_heads}; change one of them in the size gin file.')
    if self.d_model % self.conv_groups:
      raise ValueError(
          f'ModelConfig: d_model={self.d_model} is not divisible by '
          f'conv_groups={self.conv_groups}; change ModelConfig.conv_groups.')
    if self.conv_kernel_size % 2 != 1:
      raise ValueError(
          f'ModelConfig: conv_kernel_size={self.conv_kernel_size} must be odd '
          '(the depthwise convolution is centred).')
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f'ModelConfig: remat_policy={self.remat_policy!r} is not one of '
          f'{tuple(REMAT_POLICIES)}.')
    if self.scan_unroll < 1:
      raise ValueError(
          f'ModelConfig: scan_unroll={self.scan_unroll} must be at least 1 '
          '(1 = one layer per loop iteration).')
    for name in ('transposed_weight_gradient', 'flipped_weight_gradient', 'cpu_bf16_products'):
      if getattr(self, name) not in (True, False, 'auto'):
        raise ValueError(f"ModelConfig: {name}={getattr(self, name)!r}; use True, False or 'auto'.")
    if self.dtype not in ('float32', 'bfloat16'):
      raise ValueError(
          f"ModelConfig: dtype={self.dtype!r}; use 'float32' or 'bfloat16'.")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)
