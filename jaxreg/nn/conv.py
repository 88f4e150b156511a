"""3-D convolution formulations with the signature of ``lax.conv_general_dilated``.

XLA:CPU runs 3-D convolutions (and especially the gradient of strided ones)
several times slower than 2-D ones. :func:`conv3d_folded` computes the same
convolution with the kernel's depth index unrolled: each depth tap ``k`` is a
2-D convolution of the depth-shifted input with the depth folded into the
batch, ``[B, D, H, W, C] -> [B * D', H, W, C]``. Three ways to combine taps:

* ``"sum"``: one 2-D convolution per tap, summed (the default for wide layers);
* ``"concat"``: the taps' inputs stacked on channels and one 2-D convolution
  with a ``[kh, kw, kd * C, O]`` kernel (best for few input channels);
* ``"outputs"``: the taps stacked on the *output* channels: one 2-D
  convolution of the unshifted input with a ``[kh, kw, C, kd * O]`` kernel,
  then the ``kd`` output groups shifted along depth and summed (best for few
  output channels: XLA:CPU's 2-D convolution is slow for narrow outputs, a
  16 -> 3 head at 64^3 runs 5x faster forward, 2x with gradients).

Pass it to ``flax.nnx.Conv(..., conv_general_dilated=conv3d_folded)``; it is
numerically the same operation (tested against ``lax.conv_general_dilated``).
Accelerators keep the native convolution (``jaxreg.nn.model`` picks per backend).

:func:`conv3d_upsampled` is a UNet decoder's convolution of a nearest-neighbour
x2-upsampled input computed at the input's own resolution: each of the 8 output
parities is a 2x2x2 convolution with summed taps, 27/8 fewer multiply-adds and no
upsampled array.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["conv3d_folded", "conv3d_upsampled", "CONV_IMPLS", "NDHWC", "conv_fn", "resolve"]

CONV_IMPLS = ("native", "folded", "auto")
NDHWC = ("NDHWC", "DHWIO", "NDHWC")  # the dimension numbers conv3d_folded rewrites
_CONCAT_MAX_CHANNELS = 8  # "concat" up to this many input channels, "sum" above
_OUTPUTS_MAX_CHANNELS = 12  # "outputs" up to this many kd * O (stride 1 in depth)


def _is_ndhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    # ('NDHWC', 'DHWIO', 'NDHWC') in ConvDimensionNumbers form
    return (tuple(dimension_numbers.lhs_spec) == (0, 4, 1, 2, 3)
            and tuple(dimension_numbers.rhs_spec) == (4, 3, 0, 1, 2)
            and tuple(dimension_numbers.out_spec) == (0, 4, 1, 2, 3))
  return tuple(dimension_numbers) == NDHWC


def conv3d_folded(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                  dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                  precision=None, preferred_element_type=None, out_sharding=None, *,
                  combine: str | None = None):
  """A drop-in for ``lax.conv_general_dilated`` on NDHWC/DHWIO 3-D convolutions.

  Supported: any kernel size, strides and padding (``"SAME"``, ``"VALID"`` or
  explicit pairs); other cases (dilation, groups, other layouts, an explicit
  ``out_sharding``) fall back to ``lax.conv_general_dilated``.

  Args:
    lhs: ``[B, D, H, W, C]`` input.
    rhs: ``[kd, kh, kw, C, O]`` kernel.
    window_strides: as ``lax.conv_general_dilated``.
    padding: as ``lax.conv_general_dilated``.
    lhs_dilation: as ``lax.conv_general_dilated``.
    rhs_dilation: as ``lax.conv_general_dilated``.
    dimension_numbers: as ``lax.conv_general_dilated``.
    feature_group_count: as ``lax.conv_general_dilated``.
    batch_group_count: as ``lax.conv_general_dilated``.
    precision: as ``lax.conv_general_dilated``.
    preferred_element_type: as ``lax.conv_general_dilated``.
    out_sharding: as ``lax.conv_general_dilated``.
    combine: ``"sum"``, ``"concat"``, ``"outputs"`` or None (choose by the
      channel counts: ``"outputs"`` for ``kd * O <= 12`` with depth stride 1,
      else ``"concat"`` for ``C <= 8``, else ``"sum"``).

  Returns:
    ``[B, D', H', W', O]``, equal to ``lax.conv_general_dilated`` up to rounding.
  """
  native = functools.partial(
      lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type,
      **({} if out_sharding is None else {"out_sharding": out_sharding}))
  dilated = any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
  if (lhs.ndim != 5 or not _is_ndhwc(dimension_numbers) or dilated or feature_group_count != 1
      or batch_group_count != 1 or out_sharding is not None):
    return native()
  b, d, h, w, c = lhs.shape
  kd, kh, kw, _, o = rhs.shape
  strides = tuple(window_strides)
  if isinstance(padding, str):
    pads = lax.padtype_to_pads((d, h, w), (kd, kh, kw), strides, padding)
  else:
    pads = [tuple(p) for p in padding]
  (dlo, dhi), hw_pads = pads[0], list(pads[1:])
  sd = strides[0]
  out_d = (d + dlo + dhi - kd) // sd + 1
  conv2d = functools.partial(lax.conv_general_dilated, window_strides=strides[1:],
                             padding=hw_pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                             precision=precision, preferred_element_type=preferred_element_type)
  if combine is None:
    if sd == 1 and kd * o <= _OUTPUTS_MAX_CHANNELS:
      combine = "outputs"
    else:
      combine = "concat" if c <= _CONCAT_MAX_CHANNELS else "sum"
  if combine == "outputs":
    # y[i, k] = x[i] (*) rhs[k] in 2-D; out[j] = sum_k y_padded[sd * j + k, k].
    kernel = jnp.transpose(rhs, (1, 2, 3, 0, 4)).reshape(kh, kw, c, kd * o)
    y = conv2d(lhs.reshape(b * d, h, w, c), kernel)
    y = y.reshape((b, d) + y.shape[1:3] + (kd, o))
    y = jnp.pad(y, ((0, 0), (dlo, dhi)) + ((0, 0),) * 4)
    return sum(lax.slice_in_dim(y[..., k, :], k, k + sd * (out_d - 1) + 1, stride=sd, axis=1)
               for k in range(kd))
  xp = jnp.pad(lhs, ((0, 0), (dlo, dhi), (0, 0), (0, 0), (0, 0)))
  taps = [lax.slice_in_dim(xp, k, k + sd * (out_d - 1) + 1, stride=sd, axis=1)
          .reshape(b * out_d, h, w, c) for k in range(kd)]
  if combine == "concat":
    kernel = jnp.transpose(rhs, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * c, o)
    out = conv2d(jnp.concatenate(taps, axis=-1), kernel)
  elif combine == "sum":
    out = sum(conv2d(t, rhs[k]) for k, t in enumerate(taps))
  else:
    raise ValueError(f"combine must be 'sum', 'concat', 'outputs' or None, got {combine!r}")
  return out.reshape((b, out_d) + out.shape[1:])


# Nearest x2 upsampling then a 3-tap kernel (offsets -1, 0, +1 of the fine grid), seen from
# the coarse grid: fine voxel 2i + p reads coarse voxels i - 1 + p and i + p with the taps
# summed as below (rows: the 2 coarse taps; columns: the 3 fine taps), for parity p = 0, 1.
_PARITY_TAPS = np.array([[[1, 0, 0], [0, 1, 1]],
                         [[1, 1, 0], [0, 0, 1]]], np.float32)


def conv3d_upsampled(x: jax.Array, kernel: jax.Array, conv=None) -> jax.Array:
  """``conv(upsample2(x), kernel)`` without the upsampled array.

  ``upsample2`` is nearest-neighbour x2 along the three spatial axes and
  ``conv`` a stride-1 ``"SAME"`` 3x3x3 convolution with zero padding. Output
  voxel ``2i + p`` (per axis, parity ``p``) only reads coarse voxels ``i - 1 + p``
  and ``i + p``, so each of the 8 parities is a 2x2x2 convolution of the coarse
  input, zero-padded by ``(1 - p, p)`` per axis, with the kernel's taps summed
  accordingly; the parities are then interleaved. Equal to the
  upsample-then-convolve form up to rounding (``tests/test_conv.py``), with
  8/27 of its multiply-adds.

  Args:
    x: ``[B, D, H, W, C]`` coarse input.
    kernel: ``[3, 3, 3, C, O]`` kernel (DHWIO).
    conv: a ``lax.conv_general_dilated``-like callable for the 2x2x2 convolutions
      (default :func:`conv3d_folded`).

  Returns:
    ``[B, 2D, 2H, 2W, O]``.
  """
  if kernel.shape[:3] != (3, 3, 3) or x.ndim != 5 or kernel.shape[3] != x.shape[-1]:
    raise ValueError(f"need x [B, D, H, W, C] and a [3, 3, 3, C, O] kernel, got {x.shape} "
                     f"and {kernel.shape}")
  conv = conv3d_folded if conv is None else conv
  b, d, h, w, _ = x.shape
  taps = jnp.asarray(_PARITY_TAPS, kernel.dtype)
  outs = []
  for p in range(2):
    for q in range(2):
      for r in range(2):
        k = jnp.einsum("pi,qj,rk,ijkmo->pqrmo", taps[p], taps[q], taps[r], kernel)
        # Padding inside the convolution, not a padded copy + "VALID": XLA:CPU's 2-D
        # convolution is 3-4x slower on the odd-sized padded arrays (measured).
        outs.append(conv(x, k, (1, 1, 1), [(1 - p, p), (1 - q, q), (1 - r, r)],
                         dimension_numbers=NDHWC))
  out = jnp.stack(outs, axis=-2).reshape(b, d, h, w, 2, 2, 2, -1)
  return out.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, 2 * d, 2 * h, 2 * w, -1)


def resolve(impl: str) -> str:
  """``"native"`` or ``"folded"``: what a model option means on the current backend."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
  if impl == "auto":
    return "folded" if jax.default_backend() == "cpu" else "native"
  return impl


def conv_fn(impl: str):
  """The convolution callable for a model option: ``native``, ``folded`` or ``auto``.

  ``auto`` is ``folded`` on CPU (measured faster there) and native elsewhere
  (cuDNN / TPU convolutions).
  """
  return conv3d_folded if resolve(impl) == "folded" else lax.conv_general_dilated
