"""Small building blocks shared by the mSLAM modules.

Conventions: `paddings` are float arrays `[batch, length]` with 1.0 at padded
positions (praxis/lingvo style); every sequence op takes them explicitly.
Every parameter carries logical axis names; the logical-to-mesh rules live in gin.
"""

import functools
import math
from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mslam_jax import host_cpu

# Activation axis names pinned at block boundaries.
BATCH_LENGTH_EMBED = ('batch', 'length', 'embed')

# transposed_weight_gradient='auto' writes x^T out for fp32 layers at least this
# wide, on AVX2-only CPUs: measured faster there at d_in 256 and 1024 (1.01-1.14x
# steps), slower at 64 (the tiny demo model, 1.19x; benchmarks/RESULTS.md).
# flipped_weight_gradient='auto' takes the same floor for a layer's output width
# (d_model), on AVX-512 CPUs: measured at d 256 and 1024.
AUTO_TRANSPOSED_MIN_WIDTH = 256


def logical_init(init, axes: Sequence[str]):
  """Wraps an initializer so the parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


def dense(features: int, axes: Sequence[str], *, name: str, dtype=jnp.float32,
          use_bias: bool = True, kernel_init=None,
          transposed_weight_gradient: Union[bool, str] = False,
          flipped_weight_gradient: Union[bool, str] = False,
          cpu_bf16_products: Union[bool, str] = False) -> nn.Dense:
  """A Dense layer whose kernel has logical axes `axes` = (in_axis, out_axis).

  transposed_weight_gradient: True takes the kernel's gradient as a product of
  a written-out x^T (`matmul_transposed_weight_gradient`), False as autodiff's
  x^T dy; 'auto' does the first only where it was measured to pay
  (`_dot_auto`; `ModelConfig.transposed_weight_gradient` has the figures).
  flipped_weight_gradient: the same choice for the kernel's gradient taken as
  (dy^T x)^T (`matmul_flipped_weight_gradient`; 'auto': `_dot_auto_flipped`).
  A layer takes at most one of the two.
  cpu_bf16_products: where `takes_bf16_products`, the product, its bias and
  their gradients go through `affine` (and the two options above are not used).
  """
  kernel_init = kernel_init or nn.initializers.lecun_normal()
  # The settings are checked where users give them (ModelConfig.__post_init__).
  if transposed_weight_gradient is not False and flipped_weight_gradient is not False:
    raise ValueError(f'dense {name!r}: transposed_weight_gradient and flipped_weight_gradient '
                     'are two forms of one gradient; set at most one.')
  dot_general = ({True: _dot_flipped_weight_gradient, 'auto': _dot_auto_flipped}
                 .get(flipped_weight_gradient)
                 or {True: _dot_transposed_weight_gradient, False: None,
                     'auto': _dot_auto}[transposed_weight_gradient])
  return FlatDense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=logical_init(kernel_init, axes),
      bias_init=logical_init(nn.initializers.zeros_init(), axes[-1:]),
      dot_general=dot_general,
      cpu_bf16_products=cpu_bf16_products,
      name=name)


def _matmul_fwd(x, w):
  """The forward pass of both custom products below: x @ w, keeping x and w."""
  return x @ w, (x, w)


@jax.custom_vjp
def matmul_transposed_weight_gradient(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [rows, d_in] @ w [d_in, d_out], whose backward takes dw from a written-out x^T.

  Autodiff's dw = x^T dy contracts the rows of both operands, which XLA:CPU
  runs as one product with a transposed operand. On an AVX2-only CPU that
  product ran at about half the matmul rate for a widening layer (x [1600, 1024],
  dy [1600, 4096]: 78 against 144 GFLOP/s with x^T copied out first;
  benchmarks/RESULTS.md). The optimization barrier keeps XLA from folding
  the copy back into the product. Same values as `x @ w`, and dx = dy w^T as
  autodiff's.
  """
  return x @ w


def _matmul_twg_bwd(residuals, dy):
  x, w = residuals
  return dy @ w.T, lax.optimization_barrier(x.T) @ dy


matmul_transposed_weight_gradient.defvjp(_matmul_fwd, _matmul_twg_bwd)


@jax.custom_vjp
def matmul_flipped_weight_gradient(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [rows, d_in] @ w [d_in, d_out], whose backward takes dw as (dy^T x)^T.

  Both forms contract the rows of x and dy. XLA:CPU runs that product faster
  when its output has the fewer rows: for the d 256 feed-forward's wo
  (x [3200, 1024], dy [3200, 256]) dy^T x ([256, 1024]) was 1.11-1.39x as
  fast as x^T dy ([1024, 256]) on an AVX-512 CPU, and level at the 0.6B
  width's [1600, 4096] -> 1024 (`benchmarks/weight_gradient.py`,
  benchmarks/RESULTS.md). So a narrowing layer (d_in > d_out) takes the
  product the other way round and transposes its small [d_out, d_in] result;
  the optimization barrier keeps XLA from folding that transpose back into
  the product. Same values as `x @ w`, and dx = dy w^T as autodiff's.
  """
  return x @ w


def _matmul_flipped_bwd(residuals, dy):
  x, w = residuals
  dw_t = lax.dot_general(dy, x, (((0,), (0,)), ((), ())))  # [d_out, d_in]
  return dy @ w.T, lax.optimization_barrier(dw_t).T


matmul_flipped_weight_gradient.defvjp(_matmul_fwd, _matmul_flipped_bwd)


def _forced_dot(matmul, setting: str):
  """nn.Dense's `dot_general` for `setting`=True: FlatDense's product through `matmul`."""

  def dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    if ((lhs.ndim, rhs.ndim) != (2, 2) or dimension_numbers != (((1,), (0,)), ((), ()))
        or precision is not None or preferred_element_type is not None):
      raise ValueError(
          f'{setting} takes FlatDense\'s [rows, d_in] x [d_in, d_out] product at default '
          f'precision, got {lhs.shape} x {rhs.shape} with {dimension_numbers}, '
          f'precision={precision}, preferred_element_type={preferred_element_type}.')
    return matmul(lhs, rhs)

  return dot


def transposed_pays(d_in: int, d_out: int) -> bool:
  """Where transposed_weight_gradient='auto' writes x^T out (fp32 programs for the CPU):
  layers at least AUTO_TRANSPOSED_MIN_WIDTH wide on an AVX2-only host."""
  del d_out  # measured by the input width (d_model) alone
  return d_in >= AUTO_TRANSPOSED_MIN_WIDTH and host_cpu.avx2_without_avx512()


def flipped_pays(d_in: int, d_out: int) -> bool:
  """Where flipped_weight_gradient='auto' flips the product (fp32 programs for the CPU):
  narrowing layers with outputs at least AUTO_TRANSPOSED_MIN_WIDTH wide on an AVX-512 host."""
  return d_in > d_out >= AUTO_TRANSPOSED_MIN_WIDTH and host_cpu.has_avx512()


def takes_form(setting: Union[bool, str], pays, d_in: int, d_out: int, dtype) -> bool:
  """Whether a layer with this setting (True, False, 'auto') takes that weight-gradient
  form in a CPU program; `pays` is `transposed_pays` or `flipped_pays`."""
  if setting == 'auto':
    return jnp.dtype(dtype) == jnp.float32 and pays(d_in, d_out)
  return bool(setting)


def _auto_dot(forced, pays):
  """nn.Dense's `dot_general` for a setting of 'auto': `forced` where it was measured to pay.

  That is fp32 products for which `pays(d_in, d_out)` holds (it asks
  `mslam_jax.host_cpu` about this host), in programs for the CPU backend. The
  platform is the one lowered for (`lax.platform_dependent`), so a TPU program
  compiled on a CPU host (`mslam_jax.compile --topology`) keeps autodiff's
  product; elsewhere this is nn.Dense's own `lax.dot_general`.
  """

  def dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    plain = lambda x, w: lax.dot_general(x, w, dimension_numbers, precision,
                                         preferred_element_type)
    if not takes_form('auto', pays, lhs.shape[-1], rhs.shape[-1], lhs.dtype):
      return plain(lhs, rhs)
    return lax.platform_dependent(
        lhs, rhs, default=plain,
        cpu=lambda x, w: forced(x, w, dimension_numbers, precision, preferred_element_type))

  return dot


_dot_transposed_weight_gradient = _forced_dot(matmul_transposed_weight_gradient,
                                              'transposed_weight_gradient')
_dot_auto = _auto_dot(_dot_transposed_weight_gradient, transposed_pays)
_dot_flipped_weight_gradient = _forced_dot(matmul_flipped_weight_gradient,
                                           'flipped_weight_gradient')
_dot_auto_flipped = _auto_dot(_dot_flipped_weight_gradient, flipped_pays)


def written_transpose(a: jax.Array, axes: Sequence[int] = (1, 0)) -> jax.Array:
  """a transposed (`jnp.transpose(a, axes)`; a [m, n] -> a^T [n, m] by default), written
  out in row-major order.

  XLA lays a transpose that feeds a product (or is fed by one) out as that
  operand's layout instead of copying it; XLA:CPU's YNNPACK products take
  row-major operands only, so a bf16 product on such an operand is converted
  to float32 or, with a float32 result, fails at run time (jaxlib 0.10.2's
  Eigen fallback has no bf16 x bf16 -> float32 kernel). A reshape of the
  transposed layout to one axis cannot be a bitcast, so it makes the copy;
  the barrier keeps XLA from cancelling it with the reshape back.
  """
  shape = tuple(a.shape[axis] for axis in axes)
  return lax.optimization_barrier(jnp.transpose(a, axes).reshape(-1)).reshape(shape)


def _float32_product(a: jax.Array, b: jax.Array, contracting) -> jax.Array:
  """a . b over `contracting` = ((a's axes), (b's axes)), accumulated and returned in float32."""
  return lax.dot_general(a, b, (contracting, ((), ())), preferred_element_type=jnp.float32)


def affine_float32_accumulation(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """x [rows, d_in] @ w [d_in, d_out] + b [d_out] for bf16 operands, accumulated in float32.

  The product's float32 result takes the bias in float32 and is rounded to
  bf16 once. XLA:CPU runs a bf16 x bf16 -> float32 product in YNNPACK with
  the CPU's AVX-512 BF16 dot instructions: 370-430 GFLOP/s on a 2-core
  AMD EPYC at the Conformer's shapes, against 200-215 for float32; the
  bf16 -> bf16 product of nn.Dense it converts to float32 first (190;
  benchmarks/RESULTS.md). The gradients (`_float32_accumulation_gradients`)
  take their products the same way, and the bias's is a float32 sum (XLA:CPU
  splits a bf16 sum into slow windowed partial sums). The forward product is
  a plain dot_general, so remat policies that save products save it.
  """
  product = lax.stop_gradient(_float32_product(x, w, ((1,), (0,))))
  y = _float32_accumulation_gradients(product, x, w)
  return (y + b.astype(jnp.float32)).astype(x.dtype)


@jax.custom_vjp
def _float32_accumulation_gradients(product: jax.Array, x: jax.Array, w: jax.Array):
  """`product` (= x @ w in float32), through which x and w get their gradients as products
  of bf16 operands accumulated in float32: dx = dy w^T, and dw from the written-out
  transpose (`written_transpose`) of the smaller of x and dy (on a transpose that XLA
  leaves in place the product would run in float32)."""
  del x, w
  return product


def _gradients_fwd(product, x, w):
  return product, (x, w)


def _gradients_bwd(residuals, dy):
  x, w = residuals
  dy = dy.astype(x.dtype)
  dx = _float32_product(dy, w, ((1,), (1,))).astype(x.dtype)
  if x.shape[1] <= dy.shape[1]:
    dw = _float32_product(written_transpose(x), dy, ((1,), (0,)))
  else:  # (dy^T x)^T; the barrier keeps the small transpose off the product's layout
    dw = lax.optimization_barrier(_float32_product(written_transpose(dy), x, ((1,), (0,)))).T
  return None, dx, dw.astype(w.dtype)


_float32_accumulation_gradients.defvjp(_gradients_fwd, _gradients_bwd)


@jax.custom_vjp
def attention_float32_accumulation(query: jax.Array, key: jax.Array, value: jax.Array,
                                   bias: jax.Array) -> jax.Array:
  """`dot_product_attention` for bf16 q, k, v [B, T, N, H]: its six products (two forward,
  four backward) as bf16 products accumulated in float32, each on row-major operands.

  Why and how as `affine_float32_accumulation`: q, k, v and the output gradient
  are written out head-major ([B, N, T, H], `written_transpose`), the keys' and
  values' gradients are taken the other way round ([B, N, H, S]: the products
  contract the [T, S] scores along their minor axis), and each float32 result
  is written back to [B, T, N, H] before it is rounded. The softmax runs in
  float32; its bf16 probabilities are kept for the backward. Alone, forward +
  backward at [2, 1600, 4, 64] on a 2-core AMD EPYC with AVX-512 BF16: 146 ms
  against 215 for `dot_product_attention` on bf16 inputs (benchmarks/RESULTS.md).
  """
  return _attention_fwd(query, key, value, bias)[0]


def _head_major(a: jax.Array) -> jax.Array:
  return written_transpose(a, (0, 2, 1, 3))


def _attention_fwd(query, key, value, bias):
  scale = jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
  q, k, v = _head_major(query * scale), _head_major(key), _head_major(value)
  logits = jnp.einsum('bnth,bnsh->bnts', q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits + bias, axis=-1).astype(query.dtype)
  out = jnp.einsum('bnts,bnsh->bnth', probs, v, preferred_element_type=jnp.float32)
  return _head_major(out).astype(query.dtype), (q, k, v, probs)


def _attention_bwd(residuals, grad):
  q, k, v, probs = residuals   # q is scaled by 1/sqrt(H)
  scale = q.shape[-1] ** -0.5
  product = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  dv = product('bnht,bnts->bnhs', written_transpose(grad, (0, 2, 3, 1)), probs)
  dprobs = product('bnth,bnsh->bnts', _head_major(grad), v)
  p = probs.astype(jnp.float32)
  dlogits = (p * (dprobs - jnp.sum(dprobs * p, axis=-1, keepdims=True))).astype(grad.dtype)
  dq = _head_major(product('bnts,bnsh->bnth', dlogits, k)) * scale
  dk = product('bnht,bnts->bnhs', written_transpose(q, (0, 1, 3, 2)), dlogits)
  to_keys = lambda d: written_transpose(d, (0, 3, 1, 2)).astype(grad.dtype)  # [B, S, N, H]
  return dq.astype(grad.dtype), to_keys(dk), to_keys(dv), None


attention_float32_accumulation.defvjp(_attention_fwd, _attention_bwd)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array,
              cpu_bf16_products: Union[bool, str]) -> jax.Array:
  """`dot_product_attention`, or `attention_float32_accumulation` where
  `takes_bf16_products` (`_plain_or_float32_accumulation`)."""
  return _plain_or_float32_accumulation(cpu_bf16_products, dot_product_attention,
                                        attention_float32_accumulation, query, key, value, bias)


def bf16_products_pay() -> bool:
  """Where cpu_bf16_products='auto' takes the float32-accumulation products (bf16 layers,
  CPU programs): hosts with AVX-512 BF16, where they were measured."""
  return host_cpu.has_avx512_bf16()


def takes_bf16_products(setting: Union[bool, str], dtype) -> bool:
  """Whether a layer of `dtype` with `cpu_bf16_products=setting` (True, False, 'auto';
  `ModelConfig.cpu_bf16_products`) goes through `affine_float32_accumulation` or
  `attention_float32_accumulation` (for 'auto', in CPU programs only:
  `_plain_or_float32_accumulation`)."""
  if jnp.dtype(dtype) != jnp.bfloat16:
    return False
  return setting is True or (setting == 'auto' and bf16_products_pay())


def _plain_or_float32_accumulation(setting: Union[bool, str], plain, float32_accumulation,
                                   *args: jax.Array) -> jax.Array:
  """`float32_accumulation(*args)` where `takes_bf16_products(setting, args[0].dtype)`:
  with True in every program, with 'auto' in programs for the CPU backend
  (`lax.platform_dependent`; a TPU program compiled on this host keeps `plain`).
  Elsewhere `plain(*args)`."""
  if not takes_bf16_products(setting, args[0].dtype):
    return plain(*args)
  if setting is True:
    return float32_accumulation(*args)
  return lax.platform_dependent(*args, default=plain, cpu=float32_accumulation)


def affine(x: jax.Array, w: jax.Array, b: jax.Array, cpu_bf16_products: Union[bool, str]):
  """x [rows, d_in] @ w [d_in, d_out] + b [d_out] in x's dtype (x, w and b of one dtype),
  through `affine_float32_accumulation` where `takes_bf16_products`
  (`_plain_or_float32_accumulation`)."""
  return _plain_or_float32_accumulation(cpu_bf16_products, lambda x, w, b: x @ w + b,
                                        affine_float32_accumulation, x, w, b)


class FlatDense(nn.Dense):
  """nn.Dense (same parameters) that multiplies x [..., d_in] as one [rows, d_in] matrix.

  With [B, T, d_in] inputs the weight gradient contracts two axes (B and T),
  which XLA:CPU runs below its matmul rate; as one [B*T, d_in] operand it is a
  plain product. Measured (benchmarks/RESULTS.md, alternated against the
  3-D form on a 2-core CPU): the Conformer stack step 5-12% faster at d 256,
  level to 5% faster at d 1024; on a sharded step fewer all-gathers (the
  tiny step on a (2, 2, 2) mesh: 238 against 262 for 8 CPU devices, 116
  against 122 for a v5p-16) and no more memory. The merged row axis keeps
  the batch axis's sharding (batch is the major axis).
  """

  cpu_bf16_products: Union[bool, str] = False

  @nn.compact
  def __call__(self, x):
    rows = x.reshape(-1, x.shape[-1])
    if self.use_bias and takes_bf16_products(self.cpu_bf16_products, self.dtype):
      # nn.Dense's parameters (names, shapes, initializers), through `affine`.
      kernel = self.param('kernel', self.kernel_init, (rows.shape[-1], self.features),
                          self.param_dtype)
      bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      y = affine(rows.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype),
                 self.cpu_bf16_products)
    else:
      y = super().__call__(rows)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class MultiAxisDense(nn.Module):
  """x [..., *in_shape] . kernel [*in_shape, *out_shape] + bias [*out_shape].

  For the attention projections: [B, T, d] -> [B, T, heads, head_dim] and back.
  Unlike nn.DenseGeneral, the kernel is created at its final shape (fan-in =
  product of the input axes, as DenseGeneral's LeCun init), so its logical
  names always match its rank: DenseGeneral initialises a flat kernel and
  reshapes it, which breaks a logical sharding constraint under a mesh.

  Attributes:
    out_shape: trailing output shape.
    num_in_axes: how many trailing input axes are contracted.
    axes: logical names of the kernel's axes (inputs then outputs).
  """
  out_shape: Sequence[int]
  num_in_axes: int
  axes: Sequence[str]
  dtype: jnp.dtype = jnp.float32
  cpu_bf16_products: Union[bool, str] = False

  @nn.compact
  def __call__(self, x):
    in_shape = tuple(x.shape[-self.num_in_axes:])
    out_shape = tuple(self.out_shape)
    n_in = len(in_shape)
    init = nn.initializers.lecun_normal(
        in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + len(out_shape))))
    kernel = self.param('kernel', logical_init(init, self.axes), in_shape + out_shape,
                        jnp.float32)
    bias = self.param('bias', logical_init(nn.initializers.zeros_init(), self.axes[n_in:]),
                      out_shape, jnp.float32)
    # One [rows, prod(in_shape)] x [prod(in_shape), prod(out_shape)] product, as in FlatDense.
    fan_in = math.prod(in_shape)
    rows = x.astype(self.dtype).reshape(-1, fan_in)
    kernel = kernel.astype(self.dtype).reshape(fan_in, -1)
    if takes_bf16_products(self.cpu_bf16_products, self.dtype):
      y = affine(rows, kernel, bias.astype(self.dtype).reshape(-1), self.cpu_bf16_products)
      return y.reshape(*x.shape[:x.ndim - n_in], *out_shape)
    y = rows @ kernel
    return y.reshape(*x.shape[:x.ndim - n_in], *out_shape) + bias.astype(self.dtype)


def layer_norm(*, name: str, dtype=jnp.float32) -> nn.LayerNorm:
  """LayerNorm over the model dim with logically named scale and bias."""
  return nn.LayerNorm(
      epsilon=1e-6,
      dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=logical_init(nn.initializers.ones_init(), ('embed',)),
      bias_init=logical_init(nn.initializers.zeros_init(), ('embed',)),
      name=name)


def zero_padded(x: jax.Array, paddings: jax.Array) -> jax.Array:
  """Zeroes padded positions: x [B, T, ...], paddings [B, T] (1 = pad)."""
  valid = (1.0 - paddings).astype(x.dtype)
  return x * valid.reshape(valid.shape + (1,) * (x.ndim - 2))


@jax.custom_vjp
def swish(x: jax.Array) -> jax.Array:
  """x * sigmoid(x) (= `jax.nn.silu`) whose backward recomputes the sigmoid from x.

  Under plain differentiation the forward stores sigmoid(x) as well as its
  output, which XLA:CPU writes in a pass of its own; here the forward is one
  fused pass and the backward one more, and only x (which the producing
  matmul's output already is) is kept for the backward.
  """
  return x * jax.nn.sigmoid(x)


def _swish_fwd(x):
  return swish(x), x


def _swish_bwd(x, grad):
  sig = jax.nn.sigmoid(x)
  return (grad * sig * (1 + x * (1 - sig)),)


swish.defvjp(_swish_fwd, _swish_bwd)


@jax.custom_vjp
def glu(x: jax.Array) -> jax.Array:
  """Gated linear unit over the last axis, a * sigmoid(b) for [a, b] = x (= `nn.glu`).

  Written like `swish`: only x is kept for the backward, which recomputes the gate.
  """
  a, b = jnp.split(x, 2, axis=-1)
  return a * jax.nn.sigmoid(b)


def _glu_fwd(x):
  return glu(x), x


def _glu_bwd(x, grad):
  a, b = jnp.split(x, 2, axis=-1)
  sig = jax.nn.sigmoid(b)
  return (jnp.concatenate([grad * sig, grad * a * sig * (1 - sig)], axis=-1),)


glu.defvjp(_glu_fwd, _glu_bwd)


# Added to the attention logits of padded keys. Finite, so that a row whose keys
# are all padded (an all-pad example) gets uniform weights instead of NaN; large
# enough that exp() of it underflows to exactly 0 next to any real logit, so
# valid outputs never depend on padded keys.
PAD_LOGIT = -1e9


def attention_bias(paddings: jax.Array) -> jax.Array:
  """Additive key mask for `dot_product_attention`: paddings [B, S] -> [B, 1, 1, S] float32."""
  return jnp.where(paddings > 0.5, PAD_LOGIT, 0.0).astype(jnp.float32)[:, None, None, :]


@jax.custom_vjp
def softmax(logits: jax.Array) -> jax.Array:
  """Softmax over the last axis whose backward keeps only its output.

  Same values as `jax.nn.softmax`; the gradient is the textbook
  p * (g - sum(g * p)), computed from the saved probabilities alone. Under
  `jax.nn.softmax`'s own differentiation XLA:CPU kept more intermediates and
  split the backward into slower passes (attention's softmax was the largest
  non-matmul cost of the step: benchmarks/RESULTS.md, "Where the step's time goes").
  """
  return jax.nn.softmax(logits, axis=-1)


def _softmax_fwd(logits):
  probs = jax.nn.softmax(logits, axis=-1)
  return probs, probs


def _softmax_bwd(probs, grad):
  return ((grad - jnp.sum(grad * probs, axis=-1, keepdims=True)) * probs,)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          bias: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(H) + bias) v, per head, with float32 logits and softmax.

  Args:
    query: [B, T, N, H].
    key, value: [B, S, N, H].
    bias: broadcastable to [B, N, T, S] (`attention_bias` for key padding).

  Returns:
    [B, T, N, H] in the query's dtype.
  """
  scale = query.shape[-1] ** -0.5
  logits = jnp.einsum('btnh,bsnh->bnts', query * jnp.asarray(scale, query.dtype), key,
                      preferred_element_type=jnp.float32)
  probs = softmax(logits + bias).astype(value.dtype)
  return jnp.einsum('bnts,bsnh->btnh', probs, value)


def shifted_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """sum_k kernel[k] * x shifted by k - K // 2 along time, zeros outside: [B, T, C].

  `depthwise_conv1d`'s forward; differentiated by autodiff when called alone
  (benchmarks/depthwise_conv.py compares the two backward passes).
  """
  width, time = kernel.shape[0], x.shape[1]
  half = width // 2
  padded = jnp.pad(x, ((0, 0), (half, half), (0, 0)))
  out = padded[:, 0:time] * kernel[0]
  for k in range(1, width):
    out = out + padded[:, k:k + time] * kernel[k]
  return out


@jax.custom_vjp
def depthwise_conv1d(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Centred depthwise 1-D convolution written as K shifted multiply-adds.

  y[b, t, c] = sum_k kernel[k, c] * x[b, t + k - K // 2, c], with zeros
  outside [0, T). This form is used instead of `nn.Conv(feature_group_count=D)`
  because XLA:CPU turns the grouped convolution's weight gradient inside
  `nn.scan` into a dense loop (benchmarks/RESULTS.md, "Depthwise convolution").

  The gradient is written out (`jax.custom_vjp`) rather than derived:
  autodiff of the shifted sum keeps all K shifted copies of x for the backward
  pass (K - 1 more [B, T, C] arrays per layer than x itself) and transposes
  every slice into a pad of its own, one more kernel each for XLA to compile.
  Here only x is kept; the input gradient is the same shifted sum of the
  output gradient with the kernel reversed, and the kernel gradient one
  reduction over (batch, time) per tap. Inside `nn.scan` (as in
  `ConformerStack`) forward + backward ran 1.26-1.37x faster than with
  autodiff's backward, in 0.44x the temporary memory (benchmarks/RESULTS.md,
  "Depthwise convolution").

  Args:
    x: [batch, time, channels]; padded frames must already be zero.
    kernel: [K, channels], K odd.

  Returns:
    [batch, time, channels].
  """
  return shifted_sum(x, kernel)


def _depthwise_conv1d_fwd(x, kernel):
  return shifted_sum(x, kernel), (x, kernel)


def _depthwise_conv1d_bwd(residuals, grad):
  """d/dx: correlation of grad with the reversed kernel; d/dkernel[k]: sum_bt grad * x shifted."""
  x, kernel = residuals
  width, time = kernel.shape[0], x.shape[1]
  half = width // 2
  grad_x = shifted_sum(grad, kernel[::-1]).astype(x.dtype)
  padded = jnp.pad(x, ((0, 0), (half, half), (0, 0)))
  # One reduction over (batch, time) per tap, accumulated in float32 whatever
  # the compute dtype. Stacking the K windows into one [B, T, K, C] reduction
  # instead wrote them out: 2x slower without scan (benchmarks/depthwise_conv.py).
  grad32 = grad.astype(jnp.float32)
  grad_kernel = jnp.stack([
      jnp.sum(padded[:, k:k + time].astype(jnp.float32) * grad32, axis=(0, 1))
      for k in range(width)])
  return grad_x, grad_kernel.astype(kernel.dtype)


depthwise_conv1d.defvjp(_depthwise_conv1d_fwd, _depthwise_conv1d_bwd)


class MaskedGroupNorm(nn.Module):
  """GroupNorm over (time, channels-in-group) that ignores padded frames.

  SLAM uses GroupNorm instead of BatchNorm in the convolution module
  (Bapna et al. 2021); its statistics span the time axis, so padded frames are
  excluded from the mean and variance to keep valid outputs padding-invariant.

  Attributes:
    num_groups: number of channel groups; must divide the channel count.
    epsilon: variance floor.
    dtype: output dtype; statistics are computed in float32.
    axis_name: logical name of the channel axis of scale and bias.
  """
  num_groups: int
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  axis_name: str = 'embed'

  @nn.compact
  def __call__(self, x: jax.Array, paddings: jax.Array) -> jax.Array:
    """x [B, T, D], paddings [B, T] -> [B, T, D]."""
    batch, time, dim = x.shape
    group_dim = dim // self.num_groups
    xg = x.astype(jnp.float32).reshape(batch, time, self.num_groups, group_dim)
    valid = (1.0 - paddings.astype(jnp.float32))[:, :, None, None]
    count = jnp.maximum(jnp.sum(valid, axis=(1, 3), keepdims=True) * group_dim, 1.0)
    mean = jnp.sum(xg * valid, axis=(1, 3), keepdims=True) / count
    centred = (xg - mean) * valid
    var = jnp.sum(centred * centred, axis=(1, 3), keepdims=True) / count
    normed = (centred * jax.lax.rsqrt(var + self.epsilon)).reshape(batch, time, dim)
    axes = (self.axis_name,)
    scale = self.param('scale', logical_init(nn.initializers.ones_init(), axes),
                       (dim,), jnp.float32)
    bias = self.param('bias', logical_init(nn.initializers.zeros_init(), axes),
                      (dim,), jnp.float32)
    return (normed * scale + bias).astype(self.dtype)


def sinusoidal_positions(length: int, dim: int, offset=0) -> jax.Array:
  """Transformer sinusoidal position table [length, dim] (Vaswani et al. 2017).

  Row r is position p = offset + r and holds sin(p / 10000^(2i/dim)) in column
  2i and cos(...) in 2i + 1; `offset` may be traced (incremental decoding).
  """
  positions = (offset + jnp.arange(length, dtype=jnp.float32))[:, None]
  inv_freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = positions * inv_freq[None, :]
  table = jnp.zeros((length, dim), jnp.float32)
  table = table.at[:, 0::2].set(jnp.sin(angles))
  table = table.at[:, 1::2].set(jnp.cos(angles[:, :dim // 2]))
  return table


def lengths_from_paddings(paddings: jax.Array) -> jax.Array:
  """Number of valid positions per row: paddings [B, T] -> int32 [B]."""
  return jnp.sum(1.0 - paddings, axis=-1).astype(jnp.int32)
