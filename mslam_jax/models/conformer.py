"""Padding-aware Conformer block and the scanned Conformer stack.

    x -> +0.5 ffn -> +mhsa -> +conv -> +0.5 ffn -> ln        (Gulati et al. 2020)

Each branch is pre-LayerNorm with a residual. Differences from the original
Conformer, following w2v-BERT (Chung et al. 2021) and SLAM (Bapna et al. 2021):
plain dot-product attention without relative positions (position comes from the
convolutions), and GroupNorm instead of BatchNorm in the convolution module.

Padding contract: `paddings` [B, T] (1 = pad) mask attention keys, are zeroed
before the depthwise convolution, and are excluded from GroupNorm statistics,
so outputs at valid positions never depend on padded content or padded length.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mslam_jax.models import layers
from mslam_jax.models.config import REMAT_POLICIES, ModelConfig


class FeedForward(nn.Module):
  """ln -> dense(d, ffn) -> swish -> dropout -> dense(ffn, d) -> dropout."""
  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, d] -> residual branch [B, T, d]."""
    cfg = self.config
    dtype = cfg.compute_dtype
    h = layers.layer_norm(name='ln', dtype=dtype)(x)
    h = layers.dense(cfg.ffn_dim, ('embed', 'mlp'), name='wi', dtype=dtype,
                     transposed_weight_gradient=cfg.transposed_weight_gradient,
                     cpu_bf16_products=cfg.cpu_bf16_products)(h)
    h = nn.with_logical_constraint(layers.swish(h), ('batch', 'length', 'mlp'))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
    h = layers.dense(cfg.d_model, ('mlp', 'embed'), name='wo', dtype=dtype,
                     flipped_weight_gradient=cfg.flipped_weight_gradient,
                     cpu_bf16_products=cfg.cpu_bf16_products)(h)
    return nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)


class SelfAttention(nn.Module):
  """ln -> q, k, v -> masked softmax attention -> out projection -> dropout."""
  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, paddings: jax.Array) -> jax.Array:
    """x [B, T, d], paddings [B, T] -> residual branch [B, T, d]."""
    cfg = self.config
    dtype = cfg.compute_dtype
    head_dim = cfg.d_model // cfg.num_heads
    h = layers.layer_norm(name='ln', dtype=dtype)(x)

    def projection(name):
      return layers.MultiAxisDense((cfg.num_heads, head_dim), num_in_axes=1,
                                   axes=('embed', 'heads', 'kv'), dtype=dtype, name=name,
                                   cpu_bf16_products=cfg.cpu_bf16_products)

    q, k, v = (projection(n)(h) for n in ('query', 'key', 'value'))  # [B, T, N, H]
    # Keys at padded positions get PAD_LOGIT; an all-pad example gets uniform weights.
    out = layers.attention(q, k, v, layers.attention_bias(paddings), cfg.cpu_bf16_products)
    out = nn.with_logical_constraint(out, ('batch', 'length', 'heads', 'kv'))
    out = layers.MultiAxisDense((cfg.d_model,), num_in_axes=2, axes=('heads', 'kv', 'embed'),
                                dtype=dtype, name='out',
                                cpu_bf16_products=cfg.cpu_bf16_products)(out)
    return nn.Dropout(cfg.dropout_rate)(out, deterministic=self.deterministic)


class ConvolutionModule(nn.Module):
  """ln -> dense(d, 2d) -> glu -> depthwise conv -> groupnorm -> swish -> dense -> dropout."""
  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, paddings: jax.Array) -> jax.Array:
    """x [B, T, d], paddings [B, T] -> residual branch [B, T, d]."""
    cfg = self.config
    dtype = cfg.compute_dtype
    h = layers.layer_norm(name='ln', dtype=dtype)(x)
    h = layers.dense(2 * cfg.d_model, ('embed', 'mlp'), name='pointwise_in', dtype=dtype,
                     transposed_weight_gradient=cfg.transposed_weight_gradient,
                     cpu_bf16_products=cfg.cpu_bf16_products)(h)
    h = layers.glu(h)
    h = layers.zero_padded(h, paddings)
    kernel = self.param(
        'depthwise_kernel',
        layers.logical_init(nn.initializers.lecun_normal(in_axis=0, out_axis=1),
                            ('conv_window', 'mlp')),
        (cfg.conv_kernel_size, cfg.d_model), jnp.float32)
    h = layers.depthwise_conv1d(h, kernel.astype(dtype))
    h = layers.MaskedGroupNorm(cfg.conv_groups, dtype=dtype, axis_name='mlp',
                               name='group_norm')(h, paddings)
    h = layers.swish(h)
    h = layers.dense(cfg.d_model, ('mlp', 'embed'), name='pointwise_out', dtype=dtype,
                     cpu_bf16_products=cfg.cpu_bf16_products)(h)
    return nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)


class ConformerBlock(nn.Module):
  """x -> +0.5 ffn -> +mhsa -> +conv -> +0.5 ffn -> ln, padded frames zeroed.

  `__call__` has the (carry, broadcast) -> (carry, None) form that `nn.scan`
  expects, so the block is scanned directly.
  """
  config: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, paddings: jax.Array):
    """x [B, T, d], paddings [B, T] -> ([B, T, d], None)."""
    cfg, det = self.config, self.deterministic
    x = nn.with_logical_constraint(x, layers.BATCH_LENGTH_EMBED)
    x = x + 0.5 * FeedForward(cfg, det, name='ffn_start')(x)
    x = x + SelfAttention(cfg, det, name='attention')(x, paddings)
    x = x + ConvolutionModule(cfg, det, name='conv')(x, paddings)
    x = x + 0.5 * FeedForward(cfg, det, name='ffn_end')(x)
    x = layers.layer_norm(name='ln_out', dtype=cfg.compute_dtype)(x)
    x = layers.zero_padded(x, paddings)
    return nn.with_logical_constraint(x, layers.BATCH_LENGTH_EMBED), None


class ConformerStack(nn.Module):
  """`num_layers` ConformerBlocks under `nn.scan` (one compiled body), with remat.

  Parameters get a leading 'layers' axis of size `num_layers`. Each block is
  rematerialised with the policy `config.remat_policy` names in
  `config.REMAT_POLICIES` (none for 'none'). `config.scan_unroll` layers run
  per loop iteration: the parameters and checkpoints are the same whatever
  its value, only the compiled program changes.
  """
  config: ModelConfig
  num_layers: int
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, paddings: jax.Array) -> jax.Array:
    """x [B, T, d], paddings [B, T] -> [B, T, d]."""
    block = ConformerBlock
    policy = REMAT_POLICIES[self.config.remat_policy].policy
    if policy is not None:
      block = nn.remat(block, policy=policy, prevent_cse=False)
    scanned = nn.scan(
        block,
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=nn.broadcast,
        length=self.num_layers,
        unroll=min(self.config.scan_unroll, self.num_layers),
        metadata_params={nn.PARTITION_NAME: 'layers'})
    x, _ = scanned(self.config, self.deterministic, name='layers')(x, paddings)
    return x


def cpu_product_forms(cfg: ModelConfig) -> Optional[str]:
  """How a CPU program of this host takes the Conformer's dense products where that is
  not nn.Dense's way, as one console line; None where every layer takes nn.Dense's.

  It asks the same rules the layers apply: `layers.takes_bf16_products` (bf16
  models: every dense layer), else `layers.takes_form` for the layers that take
  each weight-gradient setting above: the widening wi and pointwise_in, the
  narrowing wo.
  """
  d, dtype = cfg.d_model, cfg.compute_dtype
  if layers.takes_bf16_products(cfg.cpu_bf16_products, dtype):
    return ('CPU bf16 products: the Conformer\'s dense layers and attention accumulate in '
            f'float32 (cpu_bf16_products={cfg.cpu_bf16_products!r})')
  transposed = [name for name, (d_in, d_out) in (('feed-forward wi', (d, cfg.ffn_dim)),
                                                 ('convolution pointwise_in', (d, 2 * d)))
                if layers.takes_form(cfg.transposed_weight_gradient, layers.transposed_pays,
                                     d_in, d_out, dtype)]
  flipped = layers.takes_form(cfg.flipped_weight_gradient, layers.flipped_pays,
                              cfg.ffn_dim, d, dtype)
  parts = ([f'{" and ".join(transposed)} from a written-out x^T '
            f'(transposed_weight_gradient={cfg.transposed_weight_gradient!r})']
           if transposed else [])
  parts += ([f'feed-forward wo as (dy^T x)^T '
             f'(flipped_weight_gradient={cfg.flipped_weight_gradient!r})'] if flipped else [])
  return f'CPU weight gradients: {"; ".join(parts)}' if parts else None
