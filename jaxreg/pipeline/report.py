"""Pictures of a registration: ``report.png`` of ``jaxreg register``, box plots of evaluations.

Slices are shown the way radiologists and 3D Slicer show them, whatever the
array's orientation: every volume is first reordered to the closest RAS+ array
(:func:`to_ras`), then axial and coronal slices put the patient's right on the
viewer's left (radiological convention), anterior / superior at the top, and
sagittal slices put anterior on the left. Pixel aspect follows the voxel size.
Plots are written with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np

from jaxreg import io as _io
from jaxreg import metrics as _metrics
from jaxreg.ops import grid as _grid

__all__ = ["to_ras", "plane_slices", "checkerboard", "label_edges", "save_report",
           "save_box_plot", "import_in_background"]

PLANES = ("axial", "coronal", "sagittal")
_IN_PLANE = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}  # RAS axes shown


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Reorder and flip the first three axes to the closest RAS+ orientation.

  Args:
    array: ``[X, Y, Z, ...]`` volume (trailing axes kept as they are; vector
      components are *not* changed).
    affine: its ``[4, 4]`` voxel-to-world affine.

  Returns:
    ``(array, spacing)``: the reordered view and the voxel size (mm) along its axes.
  """
  ornt = nib.orientations.io_orientation(np.asarray(affine, np.float64))
  out = nib.orientations.apply_orientation(np.asarray(array), ornt)
  spacing = np.empty(3)
  spacing[ornt[:, 0].astype(int)] = _grid.spacing(affine)
  return out, spacing


def plane_slices(ras: np.ndarray, spacing: Sequence[float], index: Sequence[int] | None = None
                 ) -> dict[str, tuple[np.ndarray, float]]:
  """The three display slices of a RAS+ volume (from :func:`to_ras`).

  Args:
    ras: ``[X, Y, Z, ...]`` in RAS+ order.
    spacing: voxel size (mm) along its axes.
    index: ``(i, j, k)`` slice positions (default: the centre).

  Returns:
    ``{plane: (image, aspect)}``: each image is ``[rows, cols, ...]`` ready for
    ``imshow(origin="upper")`` and ``aspect`` its row/column pixel-size ratio.
  """
  i, j, k = index if index is not None else [n // 2 for n in ras.shape[:3]]
  sx, sy, sz = (float(s) for s in spacing)
  # rows go from anterior/superior (top) down; columns from patient right (left of screen).
  axial = np.flip(np.swapaxes(ras[:, :, k], 0, 1), (0, 1))
  coronal = np.flip(np.swapaxes(ras[:, j, :], 0, 1), (0, 1))
  sagittal = np.flip(np.swapaxes(ras[i, :, :], 0, 1), (0, 1))
  return {"axial": (axial, sy / sx), "coronal": (coronal, sz / sx),
          "sagittal": (sagittal, sz / sy)}


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
  """Alternate square tiles of two same-shape 2-D images (``tiles`` per side)."""
  if a.shape != b.shape:
    raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
  rows = (np.arange(a.shape[0]) * tiles // a.shape[0])[:, None]
  cols = (np.arange(a.shape[1]) * tiles // a.shape[1])[None, :]
  return np.where((rows + cols) % 2 == 0, a, b)


def label_edges(labels: np.ndarray) -> np.ndarray:
  """``[rows, cols]`` bool: the pixels of a 2-D label image whose label is non-zero and
  differs from one of its 4 neighbours (the image border counts as background).

  One outline image for every label at once: drawn as a single RGBA layer it
  replaces one matplotlib contour per label (122 contours took 1-2 s of a
  report with the 89 TotalSegmentator labels).
  """
  lab = np.pad(np.asarray(labels), 1)
  centre = lab[1:-1, 1:-1]
  differs = ((centre != lab[:-2, 1:-1]) | (centre != lab[2:, 1:-1])
             | (centre != lab[1:-1, :-2]) | (centre != lab[1:-1, 2:]))
  return differs & (centre != 0)


def import_in_background() -> threading.Thread:
  """Start importing matplotlib (~0.3 s) on a daemon thread, so a caller that will draw
  a report later (``jaxreg register``) overlaps it with reading and registering."""
  thread = threading.Thread(target=importlib.import_module, args=("matplotlib.figure",),
                            name="jaxreg-import-matplotlib", daemon=True)
  thread.start()
  return thread


def _figure(**kwargs):
  """A matplotlib Figure drawn off screen (Agg): no pyplot, whose import and backend
  set-up cost ~0.4 s of a ``jaxreg register`` process."""
  from matplotlib.figure import Figure
  return Figure(**kwargs)


def _colormap(name: str):
  import matplotlib
  return matplotlib.colormaps[name]


def save_report(path: str, fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray,
                disp: np.ndarray, affine: np.ndarray, *, title: str = "",
                window: tuple[float, float] = (-1000.0, 600.0), grid_every: int = 6,
                fixed_labels: np.ndarray | None = None, diff_range: float = 400.0) -> None:
  """Write a PNG: fixed, moving, warped, fixed - warped, [the fixed labels' contours on the
  warped image], checkerboard, deformation grid, Jacobian.

  One row per plane (axial, coronal, sagittal through the centre of the grid). Where
  alignment fails, the difference image shows structure (red: fixed brighter, blue:
  warped brighter) and the label contours miss the warped organs' edges.

  Args:
    path: output ``.png`` (written atomically).
    fixed: ``[X, Y, Z]`` fixed image (HU).
    moving: the moving image on the fixed grid *before* registration (HU).
    warped: the moving image after registration, on the fixed grid (HU).
    disp: ``[X, Y, Z, 3]`` displacement in voxels of the fixed grid.
    affine: the fixed grid's affine.
    title: figure title.
    window: display window (HU).
    grid_every: spacing of the deformation-grid lines, in displayed voxels.
    fixed_labels: optional ``[X, Y, Z]`` fixed label map: its contours drawn on the
      warped image (one colour per label).
    diff_range: HU at the ends of the difference image's colour scale.
  """
  shape = np.shape(fixed)
  checks = [("moving", moving), ("warped", warped), ("disp", np.asarray(disp)[..., 0])]
  if fixed_labels is not None:
    checks.append(("fixed_labels", fixed_labels))
  for name, a in checks:
    if np.shape(a) != shape:
      raise ValueError(f"{name} has shape {np.shape(a)}, fixed has {shape}")
  det = _metrics.jacobian_determinant(disp)
  # deformed coordinates (voxels, fixed grid) for the grid picture, reordered like the images
  phi = np.moveaxis(np.indices(shape), 0, -1) + np.asarray(disp, np.float64)
  views = {name: plane_slices(*to_ras(a, affine))
           for name, a in (("fixed", fixed), ("moving", moving), ("warped", warped),
                           ("det", det), ("phi", phi),
                           ("diff", np.asarray(fixed, np.float64) - np.asarray(warped)),
                           ("labels", np.zeros(shape, np.int32) if fixed_labels is None
                            else np.asarray(fixed_labels)))}
  axes_to_ras = nib.orientations.io_orientation(np.asarray(affine, np.float64))[:, 0]
  columns = ("fixed", "moving", "warped", "fixed - warped") + \
      (("fixed labels on warped",) if fixed_labels is not None else ()) + \
      ("checkerboard", "deformation grid", "det J")
  colours = _colormap("tab20")
  fig = _figure(figsize=(3 * len(columns), 9.5))
  axes = fig.subplots(3, len(columns), squeeze=False)
  lo, hi = window
  for r, plane in enumerate(PLANES):
    f, aspect = views["fixed"][plane]
    panels = {"fixed": f, "moving": views["moving"][plane][0],
              "warped": views["warped"][plane][0]}
    panels["checkerboard"] = checkerboard(f, panels["warped"])
    for c, name in enumerate(columns):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if name in panels:
        ax.imshow(panels[name], cmap="gray", vmin=lo, vmax=hi, aspect=aspect,
                  interpolation="nearest")
      elif name == "fixed - warped":
        im = ax.imshow(views["diff"][plane][0], cmap="RdBu_r", vmin=-diff_range,
                       vmax=diff_range, aspect=aspect, interpolation="nearest")
        if r == 0:
          fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
      elif name == "fixed labels on warped":
        ax.imshow(panels["warped"], cmap="gray", vmin=lo, vmax=hi, aspect=aspect,
                  interpolation="nearest")
        lab = views["labels"][plane][0]
        outline = colours(np.asarray(lab, np.int64) % 20)  # [rows, cols, 4] RGBA
        outline[..., 3] = label_edges(lab)
        ax.imshow(outline, aspect=aspect, interpolation="nearest")
      elif name == "deformation grid":
        ax.imshow(panels["warped"], cmap="gray", vmin=lo, vmax=hi, aspect=aspect, alpha=0.5)
        p = views["phi"][plane][0]
        # iso-lines of the two in-plane deformed coordinates are the warped grid lines
        for comp in range(3):
          if axes_to_ras[comp] not in _IN_PLANE[plane]:
            continue
          values = p[..., comp]
          levels = np.arange(np.floor(values.min()), np.ceil(values.max()) + 1, grid_every)
          if len(levels) > 1:
            ax.contour(values, levels=levels, colors="yellow", linewidths=0.5)
      else:
        d = views["det"][plane][0]
        im = ax.imshow(d, cmap="RdBu_r", vmin=0.0, vmax=2.0, aspect=aspect)
        if (d <= 0).any():
          ax.contour(d <= 0, levels=[0.5], colors="black", linewidths=0.8)
        if r == 0:
          fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
      if r == 0:
        ax.set_title(name)
      if c == 0:
        ax.set_ylabel(plane)
  fig.suptitle(title or "jaxreg registration (radiological view: patient right on the left)")
  fig.tight_layout()
  with _io.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, format="png", dpi=80)


def save_box_plot(path: str, values: Mapping[str, Sequence[float]], *, metric: str,
                  unit: str = "") -> None:
  """Write a PNG box plot of one metric, one box per method (NaNs dropped)."""
  names = list(values)
  data = [np.asarray([v for v in values[n] if np.isfinite(v)], np.float64) for n in names]
  fig = _figure(figsize=(1.6 * len(names) + 2, 4))
  ax = fig.subplots()
  ax.boxplot(data, showmeans=True)
  ax.set_xticks(range(1, len(names) + 1), names)
  ax.set_ylabel(f"{metric} ({unit})" if unit else metric)
  ax.set_title(metric)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  with _io.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, format="png", dpi=80)
