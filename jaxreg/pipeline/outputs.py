"""What ``jaxreg register`` writes for one registration, in one atomically written folder.

All on the fixed image's grid and affine: ``warped.nii.gz``,
``warped_labels.nii.gz`` (with moving labels), ``displacement.nii.gz`` (the
total transform for ITK/ANTs/3D Slicer: vector NIfTI, mm, LPS),
``displacement_voxel.nii.gz`` (on request, ``learn2reg=True``: the same field as
Learn2Reg stores it, ``[X, Y, Z, 3]`` fixed voxels), ``affine.txt`` (the affine
stage alone, ITK format), ``inverse_displacement.nii.gz`` (with an inverse), ``transform.h5`` (on request:
the same map as one ITK composite transform), ``ants_0GenericAffine.mat`` +
``ants_1Warp.nii.gz`` (+ ``ants_1InverseWarp.nii.gz`` with an inverse; on request: the same
map as the pair antsRegistration writes, :mod:`jaxreg.io.ants`),
``metrics.json`` (runtime per stage, XLA compilations, field quality and, with
both label maps, Dice/HD95 from :func:`jaxreg.metrics.score`) and
``report.png``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os

import numpy as np

from jaxreg import io as _io
from jaxreg import metrics as _metrics
from jaxreg.io import resample as _preprocess
from jaxreg.pipeline import affine as _affine
from jaxreg.types import Grid, InputError, Volume

__all__ = ["write_registration", "label_scores", "OUTPUT_FORMATS", "ANTS_PREFIX"]

OUTPUT_FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}
ANTS_PREFIX = "ants_"  # register --ants: ants_0GenericAffine.mat, ants_1Warp.nii.gz, ...


def label_scores(result, fixed_labels: Volume, moving_labels: Volume, *,
                 label_ids=None) -> dict:
  """:func:`jaxreg.metrics.score` of a registration run with ``moving_labels``: Dice and
  HD95 (mm) per label after it, and Dice before it (the moving labels resampled onto the
  fixed grid with the identity).

  Raises:
    ValueError: ``result`` has no warped labels.
  """
  if result.warped_labels is None:
    raise ValueError("label_scores needs a registration run with moving_labels")
  ids = list(label_ids) if label_ids else _metrics.common_labels(fixed_labels.array,
                                                                 moving_labels.array)
  before = _preprocess.resample(moving_labels, Grid.of(fixed_labels), order=0)
  return _metrics.score(fixed_labels.array, result.warped_labels, spacing=fixed_labels.spacing,
                        label_ids=ids, before=before)


def _write_h5(path: str, result) -> None:
  """``transform.h5``: ``p -> M (p + u(p))`` with ``u = M^-1 (p + d(p)) - p`` (world mm) from
  the total displacement ``d`` and the affine stage's ``M``."""
  from nibabel.affines import apply_affine

  from jaxreg.io import itk as itkio
  shape = result.displacement_mm.shape[:3]
  world = apply_affine(result.affine, np.moveaxis(np.indices(shape), 0, -1))
  matrix = np.asarray(result.affine_matrix, np.float64)
  rest = apply_affine(np.linalg.inv(matrix), world + result.displacement_mm) - world
  itkio.write_composite(path, matrix, rest, result.affine)


def _write_ants(folder: str, result) -> None:
  """The ANTs pair (:data:`ANTS_PREFIX`) of the total displacement and the affine stage, with
  the inverse warp where ``result`` has an inverse (:func:`jaxreg.io.ants.write_pair`)."""
  from jaxreg.io import ants
  ants.write_pair(os.path.join(folder, ANTS_PREFIX), result.displacement_mm,
                  np.asarray(result.affine_matrix, np.float64), result.affine,
                  inverse_mm=result.inverse_mm)


def write_registration(result, folder: str, *, fixed: Volume, moving: Volume,
                       fixed_labels: Volume | None = None, moving_labels: Volume | None = None,
                       title: str = "", label_ids=None, fmt: str = "nifti",
                       learn2reg: bool = False, itk_h5: bool = False,
                       ants: bool = False) -> dict:
  """Write ``result`` (a :class:`jaxreg.pipeline.register.Registration`) into ``folder``.

  The folder appears only when complete (:func:`jaxreg.io.atomic_dir`). ``fmt``
  (:data:`OUTPUT_FORMATS`): the format of the warped images and the ITK displacement(s):
  NIfTI, or NRRD / MetaImage (through SimpleITK, the ``itk`` extra). ``learn2reg``: also
  write ``displacement_voxel.nii.gz`` (Learn2Reg's form of the same field, NIfTI in every
  case; off by default: it is the displacement a second time). The fields are written
  uncompressed inside their ``.gz`` (:data:`jaxreg.io.nifti.FIELD_COMPRESSLEVEL`).
  ``itk_h5``: also write ``transform.h5``, the same map as one ITK composite transform (the
  affine stage and the deformable rest, :func:`jaxreg.io.itk.write_composite`; needs the
  ``itk`` extra). ``ants``: also write the ANTs pair ``ants_0GenericAffine.mat`` +
  ``ants_1Warp.nii.gz`` (NIfTI whatever ``fmt``; ``ants_1InverseWarp.nii.gz`` with an
  inverse): ``antsApplyTransforms -t ants_1Warp.nii.gz -t ants_0GenericAffine.mat`` maps as
  ``displacement.nii.gz`` (:mod:`jaxreg.io.ants`).

  Returns:
    the metrics written to ``metrics.json`` (the registration's, plus scores).
  """
  from jaxreg.pipeline import report

  if fmt not in OUTPUT_FORMATS:
    raise InputError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
  ext = OUTPUT_FORMATS[fmt]
  metrics = dict(result.metrics)
  with _io.atomic_dir(folder) as tmp, concurrent.futures.ThreadPoolExecutor(2) as pool:
    out = lambda name: os.path.join(tmp, name)
    to_vox = lambda mm: (mm @ np.linalg.inv(result.affine[:3, :3]).T).astype(np.float32)
    if fmt == "nifti":
      save = _io.save
      save_field = lambda path, mm, vox=None: _io.save_displacement(
          path, to_vox(mm) if vox is None else vox, result.affine, convention="itk")
    else:
      from jaxreg.io import itk as itkio
      save = itkio.write
      save_field = lambda path, mm, vox=None: itkio.write_displacement(path, mm, result.affine)
    # The volumes are written by two threads (zlib compresses without the GIL) while the
    # scores and the report are computed here; any error is raised below, before the
    # folder appears.
    writes = [pool.submit(save, out("warped" + ext), result.warped.astype(np.float32),
                          result.affine)]
    if result.warped_labels is not None:
      writes.append(pool.submit(save, out("warped_labels" + ext),
                                result.warped_labels.astype(np.int16), result.affine))
    writes.append(pool.submit(save_field, out("displacement" + ext), result.displacement_mm,
                              result.displacement_voxel))
    if learn2reg:
      writes.append(pool.submit(_io.save_displacement, out("displacement_voxel.nii.gz"),
                                result.displacement_voxel, result.affine, convention="voxel"))
    if result.inverse_mm is not None:
      writes.append(pool.submit(save_field, out("inverse_displacement" + ext),
                                result.inverse_mm))
    if itk_h5:
      writes.append(pool.submit(_write_h5, out("transform.h5"), result))
    if ants:
      writes.append(pool.submit(_write_ants, tmp, result))
    # scored, and the report drawn, while the volumes are written
    if fixed_labels is not None and moving_labels is not None:
      metrics.update(label_scores(result, fixed_labels, moving_labels, label_ids=label_ids))
    if metrics.get("affine", "none") != "none":
      _affine.save_itk(out("affine.txt"), result.affine_matrix)
    with open(out("metrics.json"), "w", encoding="utf-8") as f:
      json.dump(metrics, f, indent=2, default=float)
    before = _preprocess.resample(moving, Grid.of(fixed), cval=-1024.0,
                                  antialias=False)
    report.save_report(out("report.png"), fixed.array, before, result.warped,
                       result.displacement_voxel, result.affine, title=title,
                       fixed_labels=None if fixed_labels is None else fixed_labels.array)
    for w in writes:
      w.result()
  return metrics
