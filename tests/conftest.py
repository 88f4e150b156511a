"""Test set-up: 8 fake CPU devices and JAX's persistent compilation cache."""
import os

# Sharded code is tested against one device on 8 fake CPU devices; set before jax loads.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600")

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAXREG_JAX_CACHE", os.path.expanduser("~/.cache/jaxreg/jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from jaxreg.ops import warp_kernel  # noqa: E402

# The CPU warp kernel, as the CLI loads it (tests/test_warp_ffi.py compares it with XLA;
# a fresh process that never loads it runs XLA: tested there too).
warp_kernel.load(os.environ.get("JAXREG_KERNEL_CACHE") or None, required=True)

import pytest  # noqa: E402

from jaxreg.ops import losses as L  # noqa: E402

@pytest.fixture
def scratch_registry():
  """Registered loss names live for the process: forget the ones a test adds."""
  before = (dict(L._SIMILARITIES), dict(L._REGULARISERS))
  yield
  for table, saved in zip((L._SIMILARITIES, L._REGULARISERS), before):
    table.clear()
    table.update(saved)



def write_dicom_series(folder, array, affine, *, uid="1.2.826.0.1.3680043.2.1125.7",
                       intercept=-1024, tilt_mm=0.0, gaps_mm=None, prefix="slice"):
  """Write ``array [X, Y, Z]`` (HU) as a DICOM CT series, one file per k-slice, with SimpleITK.

  ``affine``: RAS voxel-to-world (no shear). Slices go along the affine's third column;
  ``tilt_mm`` shifts slice k by ``k * tilt_mm`` along the row direction (a gantry tilt),
  ``gaps_mm`` gives the distance after each slice (non-uniform spacing). Stored with
  rescale intercept ``intercept`` (ITK writes ``HU - intercept`` as the stored values).
  """
  import locale

  import numpy as np
  import SimpleITK as sitk
  saved = locale.setlocale(locale.LC_ALL)  # GDCM resets the C locale; put it back after
  try:
    return _write_dicom(folder, array, affine, uid, intercept, tilt_mm, gaps_mm, prefix, np, sitk)
  finally:
    locale.setlocale(locale.LC_ALL, saved)


def _write_dicom(folder, array, affine, uid, intercept, tilt_mm, gaps_mm, prefix, np, sitk):
  os.makedirs(folder, exist_ok=True)
  lps = np.diag([-1.0, -1.0, 1.0])
  spacing = np.linalg.norm(affine[:3, :3], axis=0)
  direction = lps @ affine[:3, :3] / spacing
  row, col, normal = direction[:, 0], direction[:, 1], direction[:, 2]
  origin = lps @ affine[:3, 3]
  writer = sitk.ImageFileWriter()
  writer.KeepOriginalImageUIDOn()
  z = 0.0
  for k in range(array.shape[2]):
    piece = sitk.GetImageFromArray(np.asarray(array[:, :, k].T[None], np.int16))
    piece.SetSpacing([float(spacing[0]), float(spacing[1]), float(spacing[2])])
    position = origin + z * normal + k * tilt_mm * row
    z += spacing[2] if gaps_mm is None else gaps_mm[k]
    tags = {"0008|0060": "CT", "0020|000e": uid, "0020|000d": uid + ".0",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{uid}.{k + 1}",
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.8f}" for v in (*row, *col)),
            "0020|0013": str(k + 1), "0028|1052": str(intercept), "0028|1053": "1",
            "0018|0050": f"{spacing[2]:.6f}"}
    for tag, value in tags.items():
      piece.SetMetaData(tag, value)
    writer.SetFileName(os.path.join(os.fspath(folder), f"{prefix}{k:04d}.dcm"))
    writer.Execute(piece)
  return folder
