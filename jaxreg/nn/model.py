"""The registration network: a plain 3-D UNet (Flax NNX) whose outputs are sub-fields.

``RegistrationNet(fixed, moving) -> [u_1, ..., u_K]``: K displacement fields,
coarse to fine, each ``[B, X_k, Y_k, Z_k, 3]`` in **voxels of its own grid**.
:func:`jaxreg.ops.decompose.combine` turns them into one field on the input grid.

Heads (``heads=``):

* ``"levels"`` (default): one 3-channel convolution on each of the K finest
  decoder levels (level k has ``1/2**(K-k)`` of the input resolution), the
  multi-resolution decomposition of the method.
* ``"full"``: K heads on the full-resolution decoder output.

Output convolutions start near zero (normal, std ``head_init``), so training
starts from the identity; ``max_disp`` optionally bounds each sub-field with
``max_disp * tanh(u / max_disp)`` (voxels of its grid).

Conditioning on the regularisation weight (amortised lambda, as HyperMorph,
Hoopes et al. 2021): with ``reg_condition`` set the network takes
``reg_weight`` ``[B]`` (lambda, inside ``reg_range``) and is trained over that
range, so one network serves every smoothness trade-off. lambda enters as
``t = 2 (log lambda - log lo) / (log hi - log lo) - 1`` in ``[-1, 1]``
(:func:`reg_code`), either

* ``"film"``: a small MLP of ``t`` gives a per-channel scale and shift of every
  UNet level's features (``x (1 + gamma) + beta``; zero-initialised, so an
  untrained conditioning is the identity), or
* ``"channel"``: ``t`` as one more constant input channel.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxreg.nn import conv as _conv_lib
from jaxreg.ops import decompose as _decompose
from jaxreg.ops.sharding import spatial

__all__ = ["UNet", "RegistrationNet", "HEADS", "REG_CONDITIONS", "predict_displacement",
           "unet_stride", "from_config", "reg_code", "compute_dtype", "COMPUTE_DTYPES"]

HEADS = ("levels", "full")
REG_CONDITIONS = ("film", "channel")


def reg_code(reg_weight: jax.Array, reg_range: Sequence[float]) -> jax.Array:
  """lambda ``[B]`` -> its position ``t`` in ``[-1, 1]`` on a log scale over ``reg_range``."""
  lo, hi = (float(v) for v in reg_range)
  t = (jnp.log(jnp.asarray(reg_weight, jnp.float32)) - jnp.log(lo)) / (jnp.log(hi) - jnp.log(lo))
  return 2.0 * t - 1.0


class FiLM(nnx.Module):
  """``t [B] -> [(gamma, beta) [B, C_l] for each level l]``: per-channel modulations.

  A two-layer MLP (``1 -> hidden -> 2 sum_l C_l``); the output layer starts at
  zero, so every gamma and beta is 0 (the identity) until training moves them.
  """

  def __init__(self, channels: Sequence[int], hidden: int = 64, *, rngs: nnx.Rngs):
    self.channels = tuple(int(c) for c in channels)
    self.inner = nnx.Linear(1, hidden, rngs=rngs)
    self.outer = nnx.Linear(hidden, 2 * sum(self.channels), kernel_init=nnx.initializers.zeros,
                            rngs=rngs)

  def __call__(self, t: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    out = self.outer(nnx.leaky_relu(self.inner(t[:, None]), 0.2))
    pieces, start = [], 0
    for c in self.channels:
      pieces.append((out[:, start:start + c], out[:, start + c:start + 2 * c]))
      start += 2 * c
    return pieces


def unet_stride(widths: Sequence[int]) -> int:
  """Total downsampling of a UNet with these level widths: every input axis must divide by it."""
  return 2 ** (len(widths) - 1)


def _conv(cin: int, cout: int, stride: int, rngs: nnx.Rngs, conv: str = "auto",
          dtype=None, **kw) -> nnx.Conv:
  return nnx.Conv(cin, cout, (3, 3, 3), strides=stride, padding="SAME", rngs=rngs,
                  conv_general_dilated=_conv_lib.conv_fn(conv), dtype=dtype,
                  param_dtype=jnp.float32, **kw)


def _upsample2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 upsampling of ``[B, X, Y, Z, C]``."""
  for axis in (1, 2, 3):
    x = jnp.repeat(x, 2, axis=axis)
  return x


def _upsample_skip_conv(conv: nnx.Conv, x: jax.Array, skip: jax.Array) -> jax.Array:
  """``conv(concat([upsample2(x), skip]))`` with the kernel split by input channels."""
  kernel = conv.kernel[...].astype(x.dtype)  # the compute dtype (bfloat16 in mixed precision)
  c = x.shape[-1]
  y = _conv_lib.conv3d_upsampled(x, kernel[..., :c, :], conv.conv_general_dilated)
  y = y + conv.conv_general_dilated(skip, kernel[..., c:, :], (1, 1, 1), "SAME",
                                    dimension_numbers=_conv_lib.NDHWC)
  return y + conv.bias[...].astype(y.dtype) if conv.bias is not None else y


class UNet(nnx.Module):
  """A VoxelMorph-style 3-D UNet, channels last.

  Level 0 works at the input resolution with ``widths[0]`` channels; level i
  is reached by a stride-2 convolution and has ``widths[i]`` channels. The
  decoder upsamples (nearest neighbour), concatenates the skip connection and
  convolves, back up to level 0. Activations are LeakyReLU(0.2).

  Args:
    in_channels: input channels.
    widths: channels per level, e.g. ``(16, 32, 32, 64)`` (4 levels, stride 8).
    convs_per_level: convolutions per encoder and decoder level.
    conv: convolution formulation, ``"auto"`` (depth-folded on CPU, native
      elsewhere), ``"native"`` or ``"folded"`` (see :mod:`jaxreg.nn.conv`).
      ``"folded"`` also computes each decoder level's first convolution as
      ``conv(upsample(x)) + conv(skip)`` with the upsampled half done at the
      coarse resolution (:func:`jaxreg.nn.conv.conv3d_upsampled`); same parameters,
      same result up to rounding.
    rngs: NNX random streams.

  Call: ``[B, X, Y, Z, C_in] -> list of [B, X/2**i, Y/2**i, Z/2**i, widths[i]]``
  for i = L-1 .. 0 (coarse to fine); X, Y, Z must be divisible by ``2**(L-1)``.
  """

  def __init__(self, in_channels: int, widths: Sequence[int] = (16, 32, 32, 64), *,
               convs_per_level: int = 1, conv: str = "auto", dtype=None, remat: bool = False,
               rngs: nnx.Rngs):
    if len(widths) < 1 or min(widths) < 1:
      raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths}")
    self.widths = tuple(int(w) for w in widths)
    self.remat = bool(remat)
    enc, cin = [], in_channels
    for i, w in enumerate(self.widths):
      convs = [_conv(cin, w, 1 if i == 0 else 2, rngs, conv, dtype)]
      convs += [_conv(w, w, 1, rngs, conv, dtype) for _ in range(convs_per_level - 1)]
      enc.append(nnx.List(convs))
      cin = w
    dec = []
    for i in range(len(self.widths) - 2, -1, -1):
      w = self.widths[i]
      convs = [_conv(cin + w, w, 1, rngs, conv, dtype)]
      convs += [_conv(w, w, 1, rngs, conv, dtype) for _ in range(convs_per_level - 1)]
      dec.append(nnx.List(convs))
      cin = w
    self.encoder = nnx.List(enc)
    self.decoder = nnx.List(dec)
    self.fuse_upsample = _conv_lib.resolve(conv) == "folded"

  @property
  def stride(self) -> int:
    return unet_stride(self.widths)

  @property
  def level_channels(self) -> tuple[int, ...]:
    """Channels of each level's output, encoder (fine to coarse) then decoder (coarse to fine)."""
    return self.widths + tuple(self.widths[i] for i in range(len(self.widths) - 2, -1, -1))

  def __call__(self, x: jax.Array, film: Sequence[tuple[jax.Array, jax.Array]] | None = None
               ) -> list[jax.Array]:
    """``film``: optional ``(gamma, beta)`` ``[B, C]`` per level (:attr:`level_channels`
    order), applied to each level's output as ``x (1 + gamma) + beta``."""
    def modulate(x, k):
      if film is None:
        return x
      gamma, beta = (v.astype(x.dtype)[:, None, None, None, :] for v in film[k])
      return x * (1.0 + gamma) + beta

    if x.ndim != 5:
      raise ValueError(f"UNet input must be [B, X, Y, Z, C], got shape {x.shape}")
    if any(n % self.stride for n in x.shape[1:4]):
      raise ValueError(f"spatial shape {x.shape[1:4]} must be divisible by {self.stride} "
                       f"(2 ** (levels - 1) for {len(self.widths)} levels)")
    fuse = self.fuse_upsample

    def encode(convs, x):
      for conv in convs:
        x = nnx.leaky_relu(conv(x), 0.2)
      return x

    def decode(convs, x, skip):
      if fuse:
        x = _upsample_skip_conv(convs[0], x, skip)
      else:
        x = convs[0](jnp.concatenate([_upsample2(x), skip], axis=-1))
      x = nnx.leaky_relu(x, 0.2)
      for conv in convs[1:]:
        x = nnx.leaky_relu(conv(x), 0.2)
      return x

    if self.remat:  # keep only each level's output for the backward pass; recompute inside
      encode, decode = nnx.remat(encode), nnx.remat(decode)
    skips = []
    x = spatial(x)  # split along X over the mesh's ``space`` axis, if any (jaxreg.ops.sharding)
    for k, convs in enumerate(self.encoder):
      x = spatial(modulate(encode(convs, x), k))
      skips.append(x)
    outs = [x]
    for k, (convs, skip) in enumerate(zip(self.decoder, reversed(skips[:-1])),
                                      start=len(self.encoder)):
      x = spatial(modulate(decode(convs, x, skip), k))
      outs.append(x)
    return outs


class RegistrationNet(nnx.Module):
  """UNet + K sub-field heads; see the module docstring.

  Args:
    in_channels: 2 (fixed, moving) plus any extra channels (e.g. organ masks).
    widths: UNet channels per level.
    num_subfields: K.
    heads: ``"levels"`` or ``"full"``.
    max_disp: optional bound (voxels of each sub-field's grid).
    head_init: std of the heads' initial weights (small: start at identity).
    convs_per_level: UNet convolutions per level.
    conv: convolution formulation (``"auto"``, ``"native"``, ``"folded"``).
    reg_condition: None, or ``"film"`` / ``"channel"``: take the regularisation
      weight as an input (see the module docstring).
    reg_range: ``(lo, hi)``, the lambda range a conditioned network is trained on.
    dtype: compute dtype of the convolutions (inputs and activations; e.g.
      ``jnp.bfloat16`` for mixed precision); parameters stay float32, and the
      sub-fields are returned in float32.
    remat: rematerialise each UNet level in the backward pass (``nnx.remat``): only
      level outputs are kept, the convolutions inside a level are recomputed.
    rngs: NNX random streams.

  Call: ``(fixed [B, X, Y, Z(, C)], moving [B, X, Y, Z(, C)], extra=None,
  reg_weight=None)`` -> list of K arrays ``[B, X_k, Y_k, Z_k, 3]`` (voxels,
  coarse to fine). ``reg_weight`` (``[B]`` or a scalar, lambda) is required by
  a conditioned network and refused by another.
  """

  def __init__(self, *, in_channels: int = 2, widths: Sequence[int] = (16, 32, 32, 64),
               num_subfields: int = 3, heads: str = "levels", max_disp: float | None = None,
               head_init: float = 1e-5, convs_per_level: int = 1, conv: str = "auto",
               reg_condition: str | None = None, reg_range: Sequence[float] = (0.1, 100.0),
               dtype=None, remat: bool = False, rngs: nnx.Rngs):
    if reg_condition is not None and reg_condition not in REG_CONDITIONS:
      raise ValueError(f"reg_condition must be None or one of {REG_CONDITIONS}, "
                       f"got {reg_condition!r}")
    lo, hi = (float(v) for v in reg_range)
    if not 0 < lo < hi:
      raise ValueError(f"reg_range must be (lo, hi) with 0 < lo < hi, got {tuple(reg_range)}")
    self.reg_condition, self.reg_range = reg_condition, (lo, hi)
    if heads not in HEADS:
      raise ValueError(f"heads must be one of {HEADS}, got {heads!r}")
    if num_subfields < 1:
      raise ValueError(f"num_subfields must be >= 1, got {num_subfields}")
    if heads == "levels" and num_subfields > len(widths):
      raise ValueError(f"heads='levels' needs num_subfields <= levels ({len(widths)}), "
                       f"got {num_subfields}")
    self.unet = UNet(in_channels + (reg_condition == "channel"), widths,
                     convs_per_level=convs_per_level, conv=conv, dtype=dtype, remat=remat,
                     rngs=rngs)
    self.film = FiLM(self.unet.level_channels, rngs=rngs) if reg_condition == "film" else None
    self.heads = heads
    self.num_subfields = num_subfields
    self.max_disp = max_disp
    init = nnx.initializers.normal(head_init)
    if heads == "levels":
      level_widths = [widths[k] for k in range(num_subfields - 1, -1, -1)]
    else:
      level_widths = [widths[0]] * num_subfields
    self.head_convs = nnx.List([_conv(w, 3, 1, rngs, conv, dtype, kernel_init=init)
                                for w in level_widths])

  def __call__(self, fixed: jax.Array, moving: jax.Array,
               extra: jax.Array | None = None, reg_weight: jax.Array | None = None
               ) -> list[jax.Array]:
    chans = [c if c.ndim == 5 else c[..., None] for c in (fixed, moving)]
    if extra is not None:
      chans.append(extra if extra.ndim == 5 else extra[..., None])
    if (reg_weight is None) != (self.reg_condition is None):
      raise ValueError("this network is conditioned on the regularisation weight: pass "
                       "reg_weight" if reg_weight is None else
                       "reg_weight given, but this network was built without reg_condition")
    film = None
    if reg_weight is not None:
      code = jnp.broadcast_to(reg_code(reg_weight, self.reg_range), fixed.shape[:1])
      if self.reg_condition == "channel":
        chans.append(jnp.broadcast_to(code[:, None, None, None, None],
                                      chans[0].shape[:4] + (1,)).astype(chans[0].dtype))
      else:
        film = self.film(code)
    x = jnp.concatenate(chans, axis=-1)
    feats = self.unet(x, film)
    if self.heads == "levels":
      feats = feats[-self.num_subfields:]
    else:
      feats = [feats[-1]] * self.num_subfields
    out = []
    for conv, f in zip(self.head_convs, feats):
      u = conv(f).astype(jnp.float32)  # fields, warps and losses stay float32
      if self.max_disp is not None:
        u = self.max_disp * jnp.tanh(u / self.max_disp)
      out.append(u)
    return out


def predict_displacement(model: RegistrationNet, fixed: jax.Array, moving: jax.Array, *,
                         method: str = "compose", steps: int = 7,
                         extra: jax.Array | None = None, reg_weight: jax.Array | None = None,
                         remat: bool = False, implementation: str | None = None
                         ) -> tuple[jax.Array, list[jax.Array]]:
  """The total displacement the network predicts for a batch.

  Args:
    model: the network.
    fixed: ``[B, X, Y, Z(, C)]`` fixed images.
    moving: ``[B, X, Y, Z(, C)]`` moving images on the same grid as ``fixed``.
    method: decomposition (``compose``, ``sum``, ``svf``).
    steps: scaling-and-squaring steps for ``svf``.
    extra: optional extra input channels.
    reg_weight: lambda ``[B]`` (or a scalar) for a conditioned network.
    remat: recompute the composition in the backward pass instead of keeping its
      interpolation intermediates (``jax.checkpoint``; saves memory, costs time).
    implementation: the warp's in the composition (``None``, ``"xla"``, ``"ffi"``;
      see :mod:`jaxreg.ops.warp`).

  Returns:
    ``(disp [B, X, Y, Z, 3] voxels, sub-fields)``.
  """
  subfields = model(fixed, moving, extra, reg_weight)
  shape = tuple(fixed.shape[1:4])
  combine = functools.partial(_decompose.combine_batch, implementation=implementation)
  if remat:
    combine = jax.checkpoint(combine, static_argnums=(1, 2, 3))
  return spatial(combine(subfields, method, shape, steps)), subfields


def from_config(config, seed: int = 0) -> "RegistrationNet":
  """The network a config describes (``config.model``)."""
  m = config.model
  extra = len(config.data.label_ids) if m.get("label_inputs", False) else 0
  return RegistrationNet(
      in_channels=2 + 2 * extra, widths=tuple(m.widths), num_subfields=m.num_subfields,
      heads=m.heads, max_disp=m.get("max_disp"), head_init=m.head_init,
      convs_per_level=m.get("convs_per_level", 1), conv=m.get("conv", "auto"),
      reg_condition=m.get("reg_conditioning", "film") if m.get("condition_on_reg", False)
      else None, reg_range=tuple(m.get("reg_range", (0.1, 100.0))),
      dtype=compute_dtype(config), remat=bool(m.get("remat", False)), rngs=nnx.Rngs(seed))


COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def compute_dtype(config):
  """The network's compute dtype for ``config.train.compute_dtype`` (None: float32)."""
  name = config.train.get("compute_dtype", "float32") if "train" in config else "float32"
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"train.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                     f"got {name!r}")
  return COMPUTE_DTYPES[name]
