"""Pictures of a registration: ``report.png`` of ``jaxreg register``, box plots of evaluations.

Slices are shown the way radiologists and 3D Slicer show them, whatever the
array's orientation: every volume is first reordered to the closest RAS+ array
(:func:`to_ras`), then axial and coronal slices put the patient's right on the
viewer's left (radiological convention), anterior / superior at the top, and
sagittal slices put anterior on the left. Pixel aspect follows the voxel size.

:func:`save_report` reads only the three displayed slices of its volumes (and a slab
of at most three slices of the displacement for det J), draws every panel with numpy
into one raster (matplotlib's gray and RdBu_r tables, Tableau's 20 colours for labels;
nearest-neighbour resampling to square display pixels), and writes its text and the PNG file with Pillow
(matplotlib's figure machinery costs a process 0.3-0.5 s to import). Box plots are drawn
with matplotlib's Agg backend (no display needed, no pyplot).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np

from jaxreg import io as _io
from jaxreg.ops import grid as _grid

__all__ = ["to_ras", "plane_slices", "checkerboard", "label_edges", "save_report",
           "save_box_plot"]

PLANES = ("axial", "coronal", "sagittal")
_IN_PLANE = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}  # RAS axes shown
_NORMAL = {"axial": 2, "coronal": 1, "sagittal": 0}  # RAS axis across each plane


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


def _figure(**kwargs):
  """A matplotlib Figure drawn off screen (Agg): no pyplot, whose import and backend
  set-up cost ~0.4 s of a ``jaxreg register`` process."""
  from matplotlib.figure import Figure
  return Figure(**kwargs)


# ColorBrewer's 11-class RdBu (blue end first: matplotlib's "RdBu_r") and Tableau's 20
# categorical colours, as published (sRGB hex); importing matplotlib for three colour maps
# cost a register process 0.1-0.15 s.
_RDBU_R = ("053061", "2166ac", "4393c3", "92c5de", "d1e5f0", "f7f7f7", "fddbc7", "f4a582",
           "d6604d", "b2182b", "67001f")
TAB20 = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in (
    "1f77b4", "aec7e8", "ff7f0e", "ffbb78", "2ca02c", "98df8a", "d62728", "ff9896", "9467bd",
    "c5b0d5", "8c564b", "c49c94", "e377c2", "f7b6d2", "7f7f7f", "c7c7c7", "bcbd22", "dbdb8d",
    "17becf", "9edae5")], np.uint8)


@functools.lru_cache(maxsize=None)
def _lut(name: str) -> np.ndarray:
  """``[256, 3]`` uint8 colour table of ``"gray"`` or ``"RdBu_r"`` (anchors evenly spaced,
  linear between them), as matplotlib tabulates its maps: 256 entries at ``linspace(0, 1)``,
  each channel times 255 truncated to uint8."""
  x = np.linspace(0.0, 1.0, 256)
  if name == "gray":
    table = np.stack([x] * 3, -1)
  elif name == "RdBu_r":
    anchors = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in _RDBU_R]) / 255.0
    at = np.linspace(0.0, 1.0, len(anchors))
    table = np.stack([np.interp(x, at, anchors[:, c]) for c in range(3)], -1)
  else:
    raise ValueError(f"no colour map {name!r}")
  return (table * 255).astype(np.uint8)


def _orientation(affine: np.ndarray) -> np.ndarray:
  """``[3, 2]`` nibabel orientation of the array axes (RAS axis, flip), as :func:`to_ras`."""
  return nib.orientations.io_orientation(np.asarray(affine, np.float64))


def _central_slices(shape: Sequence[int], affine: np.ndarray) -> dict[str, tuple[int, int]]:
  """``{plane: (axis, index)}``: the array axis across each display plane and the index
  along it of the slice that :func:`plane_slices` shows by default (the central RAS
  slice, ``n // 2`` counted from the RAS end, so ``n - 1 - n // 2`` on a flipped axis)."""
  ornt = _orientation(affine)
  out = {}
  for plane in PLANES:
    axis = int(np.flatnonzero(ornt[:, 0] == _NORMAL[plane])[0])
    n = int(shape[axis])
    out[plane] = (axis, n // 2 if ornt[axis, 1] > 0 else n - 1 - n // 2)
  return out


def _display(image: np.ndarray, axis: int, affine: np.ndarray, plane: str) -> np.ndarray:
  """A 2-D slice of the array (``[..]`` over the two array axes other than ``axis``, in
  their order, plus any trailing axes) as :func:`plane_slices` shows that plane of
  :func:`to_ras`'s volume: ``[rows, cols, ...]``, a view."""
  ras, _ = to_ras(np.expand_dims(image, axis), affine)
  return plane_slices(ras, (1.0, 1.0, 1.0), index=(0, 0, 0))[plane][0]


def _gradient(a: np.ndarray, axis: int) -> np.ndarray:
  """``numpy.gradient`` along one axis (unit spacing); zero along an axis of size 1."""
  return np.gradient(a, axis=axis) if a.shape[axis] > 1 else np.zeros_like(a)


def _jacobian_slice(disp: np.ndarray, axis: int, index: int) -> np.ndarray:
  """det J of a ``[X, Y, Z, 3]`` voxel displacement on one slice, float32.

  Equals ``jaxreg.metrics.jacobian_determinant(disp)`` at ``index`` along array axis
  ``axis`` (``det(I + grad u)``, derivatives in voxels: central differences inside,
  one-sided at the border, as ``numpy.gradient``), computed with numpy from the slab of
  at most three slices around it instead of the whole field.

  Returns:
    ``[a, b]`` over the two other array axes, in their order.
  """
  if np.ndim(disp) != 4 or np.shape(disp)[-1] != 3:
    raise ValueError(f"disp must be [X, Y, Z, 3], got {np.shape(disp)}")
  n = np.shape(disp)[axis]
  lo, hi = max(index - 1, 0), min(index + 2, n)
  take = [slice(None)] * 4
  take[axis] = slice(lo, hi)
  slab = np.asarray(disp[tuple(take)], np.float32)  # [.., <= 3 along axis, .., 3]
  centre = np.take(slab, index - lo, axis=axis)  # [a, b, 3]
  others = [j for j in range(3) if j != axis]
  rows = []
  for i in range(3):  # component u_i
    row = []
    for j in range(3):  # derivative along array axis j
      if j == axis:
        d = np.take(_gradient(slab[..., i], axis), index - lo, axis=axis)
      else:
        d = _gradient(centre[..., i], others.index(j))
      row.append(d + (1.0 if i == j else 0.0))
    rows.append(row)
  (a, b, c), (d, e, f), (g, h, k) = rows
  return (a * (e * k - f * h) - b * (d * k - f * g) + c * (d * h - e * g)).astype(np.float32)


def _plane_images(fixed, moving, warped, disp, affine, fixed_labels=None) -> dict[str, dict]:
  """The display slices of every panel: ``{plane: {name: [rows, cols(, 2)] array}}`` with
  ``fixed``, ``moving``, ``warped`` (as given), ``diff`` (fixed - warped, float64),
  ``det`` (:func:`_jacobian_slice`), ``phi`` (``[rows, cols, 2]``: the two in-plane
  deformed coordinates, array index + displacement, in voxels of the fixed grid) and
  ``labels`` (int64, when ``fixed_labels`` is given), plus ``extent`` (the slice's
  height and width in mm). Only the slices are read: the inputs may be any arrays
  that slice like numpy."""
  shape = np.shape(fixed)
  spacing = np.empty(3)
  spacing[_orientation(affine)[:, 0].astype(int)] = _grid.spacing(affine)
  out = {}
  for plane, (axis, index) in _central_slices(shape, affine).items():
    take = [slice(None)] * 3
    take[axis] = index
    take = tuple(take)
    others = [j for j in range(3) if j != axis]

    def show(a, axis=axis, plane=plane):
      return _display(a, axis, affine, plane)

    f = np.asarray(fixed[take])
    w = np.asarray(warped[take])
    u = np.asarray(disp[take], np.float64)  # [a, b, 3]
    grid = np.indices(u.shape[:2], dtype=np.float64)
    phi = np.stack([grid[n] + u[..., j] for n, j in enumerate(others)], -1)
    images = {"fixed": show(f), "moving": show(np.asarray(moving[take])), "warped": show(w),
              "diff": show(np.asarray(f, np.float64) - w), "phi": show(phi),
              "det": show(_jacobian_slice(disp, axis, index))}
    if fixed_labels is not None:
      images["labels"] = show(np.asarray(fixed_labels[take]).astype(np.int64))
    col_axis, row_axis = _IN_PLANE[plane]
    rows, cols = images["fixed"].shape
    images["extent"] = (rows * spacing[row_axis], cols * spacing[col_axis])
    out[plane] = images
  return out


def _source_index(n: int, m: int) -> np.ndarray:
  """Nearest-neighbour resampling of ``n`` pixels to ``m``: the source of each output pixel."""
  return np.minimum(((np.arange(m) + 0.5) * (n / m)).astype(np.intp), n - 1)


def _nearest(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """``image`` ``[r, c, ...]`` resampled to ``size`` ``(rows, cols)``, nearest neighbour."""
  rows = np.take(image, _source_index(image.shape[0], size[0]), axis=0)
  return np.take(rows, _source_index(image.shape[1], size[1]), axis=1)


def _bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """``image`` ``[r, c, ...]`` (float) resampled to ``size`` bilinearly; pixel centres
  aligned (output pixel ``y`` samples ``(y + 0.5) * r / rows - 0.5``, clamped)."""
  out = np.asarray(image, np.float64)
  for ax in (0, 1):
    n, m = out.shape[ax], size[ax]
    s = np.clip((np.arange(m) + 0.5) * (n / m) - 0.5, 0.0, n - 1)
    i0 = np.floor(s).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    wshape = [1] * out.ndim
    wshape[ax] = m
    w = (s - i0).reshape(wshape)
    out = np.take(out, i0, axis=ax) * (1.0 - w) + np.take(out, i1, axis=ax) * w
  return out


def _grid_lines(coords: np.ndarray, every: float) -> np.ndarray:
  """``[rows, cols]`` bool: the deformation-grid lines of ``[rows, cols, C]`` deformed
  coordinates (voxels), the iso-lines of each component at the multiples of ``every``:
  where ``floor(coordinate / every)`` changes between two 4-neighbours, the one of the
  two on the larger side (so a zero field draws the voxels whose index is a positive
  multiple of ``every``, whichever way the display flips the axis)."""
  q = np.floor(np.asarray(coords) / every)
  lines = np.zeros(q.shape[:2], bool)
  for c in range(q.shape[-1]):
    qc = q[..., c]
    lines[1:] |= qc[1:] > qc[:-1]
    lines[:-1] |= qc[:-1] > qc[1:]
    lines[:, 1:] |= qc[:, 1:] > qc[:, :-1]
    lines[:, :-1] |= qc[:, :-1] > qc[:, 1:]
  return lines


def _colour(image: np.ndarray, cmap: str, lo: float, hi: float) -> np.ndarray:
  """``[.., 3]`` uint8: ``image`` through a colour map (:func:`_lut`) scaled to ``lo..hi``
  (clipped at the ends), entry ``floor(256 x)`` (the last for ``x = 1``), as matplotlib
  indexes its tables."""
  x = np.clip((np.asarray(image, np.float64) - lo) / ((hi - lo) or 1.0), 0.0, 1.0)
  return _lut(cmap)[np.minimum((x * 256).astype(np.intp), 255)]


_CELL = 224  # display pixels along the longest side (in mm) of the three slices
_MIN_CELL = (64, 150)  # smallest cell (rows, cols) in pixels: room for the row and column names
_GAP = 8  # pixels between cells
_LEFT, _TOP, _KEY = 26, 58, 40  # margins: row names, title + column titles, colour keys
_DPI = 100
_YELLOW, _BLACK = np.array([255, 255, 0], np.uint8), np.array([0, 0, 0], np.uint8)


class _Text:
  """Text drawn onto an RGB raster with Pillow (FreeType when present): the report's titles
  and tick labels, without importing matplotlib's figure machinery (0.3-0.5 s a process).
  ``fontsize`` is in points at :data:`_DPI`, as matplotlib's."""

  def __init__(self, image: np.ndarray):
    from PIL import Image, ImageDraw
    self.canvas = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    self.draw = ImageDraw.Draw(self.canvas)
    self.fonts: dict[int, object] = {}

  def font(self, fontsize: float):
    from PIL import ImageFont
    px = max(6, round(fontsize * _DPI / 72))
    if px not in self.fonts:
      self.fonts[px] = ImageFont.load_default(size=px)
    return self.fonts[px]

  def __call__(self, x: float, y: float, s: str, *, anchor: str = "mm", fontsize: float = 11,
               rotate: bool = False) -> None:
    """``s`` at pixel ``(x, y)`` from the top left; ``anchor``: Pillow's (``"mt"``: centred
    horizontally, top at ``y``); ``rotate``: reading upwards, centred on ``(x, y)``."""
    from PIL import Image, ImageDraw
    font = self.font(fontsize)
    if not rotate:
      self.draw.text((x, y), s, fill=(0, 0, 0), font=font, anchor=anchor)
      return
    left, top, right, bottom = self.draw.textbbox((0, 0), s, font=font)
    tile = Image.new("RGB", (right - left + 2, bottom - top + 2), (255, 255, 255))
    ImageDraw.Draw(tile).text((1 - left, 1 - top), s, fill=(0, 0, 0), font=font)
    tile = tile.rotate(90, expand=True)
    self.canvas.paste(tile, (round(x - tile.width / 2), round(y - tile.height / 2)))


def _keys(window, diff_range) -> dict[str, tuple[str, float, float, tuple[str, str, str]]]:
  """The colour keys drawn under columns: ``{column: (cmap, lo, hi, tick labels)}``."""
  lo, hi = window
  r = float(diff_range)
  return {"fixed": ("gray", lo, hi, (f"{lo:g}", "HU", f"{hi:g}")),
          "fixed - warped": ("RdBu_r", -r, r, (f"{-r:g}", "0 HU", f"+{r:g}")),
          "det J": ("RdBu_r", 0.0, 2.0, ("0", "1", "2"))}


def _render(views: dict[str, dict], columns: Sequence[str], *, window, grid_every,
            diff_range) -> tuple[np.ndarray, dict]:
  """The report's raster: ``(image, layout)``.

  ``image``: ``[H, W, 4]`` uint8 RGBA (opaque), white background, a panel per (plane, column);
  ``layout``: ``{"panels": {(plane, column): (top, left, rows, cols)}, "rows": {plane:
  (top, height)}, "columns": {column: (left, width)}, "keys": {column: (top, left,
  width)}}`` in pixels, where :func:`save_report` puts the text.
  """
  lo, hi = window
  mm = max(max(v["extent"]) for v in views.values()) / _CELL  # mm per display pixel
  sizes = {p: tuple(max(1, round(e / mm)) for e in v["extent"]) for p, v in views.items()}
  width = max([_MIN_CELL[1]] + [s[1] for s in sizes.values()])
  heights = {p: max(_MIN_CELL[0], s[0]) for p, s in sizes.items()}
  keys = _keys(window, diff_range)
  total_w = _LEFT + len(columns) * (width + _GAP)
  total_h = _TOP + sum(h + _GAP for h in heights.values()) + _KEY
  image = np.full((total_h, total_w, 4), 255, np.uint8)
  layout = {"panels": {}, "rows": {}, "keys": {},
            "columns": {c: (_LEFT + n * (width + _GAP), width) for n, c in enumerate(columns)}}
  tab20 = TAB20
  top = _TOP
  for plane in PLANES:
    v, size = views[plane], sizes[plane]
    layout["rows"][plane] = (top, heights[plane])

    def gray(a, size=size):
      return _nearest(_colour(a, "gray", lo, hi), size)

    warped = gray(v["warped"])
    for column in columns:
      if column in ("fixed", "moving"):
        panel = gray(v[column])
      elif column == "warped":
        panel = warped
      elif column == "checkerboard":
        panel = gray(checkerboard(v["fixed"], v["warped"]))
      elif column == "fixed - warped":
        panel = _nearest(_colour(v["diff"], "RdBu_r", -diff_range, diff_range), size)
      elif column == "fixed labels on warped":
        panel = warped.copy()
        lab = _nearest(v["labels"], size)
        edges = label_edges(lab)
        panel[edges] = tab20[lab[edges] % 20]
      elif column == "deformation grid":
        panel = warped // 2  # the warped image at half opacity on black
        panel[_grid_lines(_bilinear(v["phi"], size), grid_every)] = _YELLOW
      else:  # det J
        panel = _nearest(_colour(v["det"], "RdBu_r", 0.0, 2.0), size)
        panel[label_edges(_nearest(v["det"] <= 0, size))] = _BLACK  # folds' outline
      y = top + (heights[plane] - size[0]) // 2  # panels centred in their cells
      x = layout["columns"][column][0] + (width - size[1]) // 2
      image[y:y + size[0], x:x + size[1], :3] = panel
      layout["panels"][plane, column] = (y, x) + size
    top += heights[plane] + _GAP
  for column, (cmap, k_lo, k_hi, _) in keys.items():
    left, key_w = layout["columns"][column][0] + 12, width - 24
    strip = _colour(np.linspace(k_lo, k_hi, key_w), cmap, k_lo, k_hi)
    image[top + 2:top + 12, left:left + key_w, :3] = strip[None]
    layout["keys"][column] = (top + 2, left, key_w)
  return image, layout


def save_report(path: str, fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray,
                disp: np.ndarray, affine: np.ndarray, *, title: str = "",
                window: tuple[float, float] = (-1000.0, 600.0), grid_every: int = 6,
                fixed_labels: np.ndarray | None = None, diff_range: float = 400.0) -> None:
  """Write a PNG: fixed, moving, warped, fixed - warped, [the fixed labels' outlines on the
  warped image], checkerboard, deformation grid, Jacobian.

  One row per plane (axial, coronal, sagittal through the centre of the grid, as
  :func:`plane_slices`), one column per panel; colour keys under the fixed, difference
  and det J columns. Where alignment fails, the difference image shows structure (red:
  fixed brighter, blue: warped brighter) and the label outlines miss the warped organs'
  edges. The deformation grid shows the warped image at half opacity (on black) with
  yellow iso-lines every ``grid_every`` voxels of the two in-plane deformed coordinates
  (array index + displacement); det J is blue below 1 (compression), red above
  (expansion), with a black outline round ``det J <= 0`` (folding). Only the three
  slices (and for det J a slab of at most 3 slices of ``disp``) are read.

  Args:
    path: output ``.png`` (written atomically).
    fixed: ``[X, Y, Z]`` fixed image (HU), in the array axis order of ``affine``.
    moving: ``[X, Y, Z]`` moving image resampled on the fixed grid *before*
      registration (HU).
    warped: ``[X, Y, Z]`` moving image after registration, on the fixed grid (HU).
    disp: ``[X, Y, Z, 3]`` displacement in voxels of the fixed grid, component ``i``
      along array axis ``i``.
    affine: the fixed grid's ``[4, 4]`` voxel-to-world affine.
    title: figure title (default: a note on the radiological view).
    window: gray display window ``(low, high)`` (HU).
    grid_every: spacing of the deformation-grid lines, in voxels of the fixed grid.
    fixed_labels: optional ``[X, Y, Z]`` fixed label map: its outlines drawn on the
      warped image (tab20 colour of ``label % 20``).
    diff_range: HU at the ends of the difference image's colour scale.

  Raises:
    ValueError: an array's shape does not match ``fixed`` (``[X, Y, Z]``; ``disp``
      ``[X, Y, Z, 3]``).
  """
  shape = tuple(np.shape(fixed))
  if len(shape) != 3:
    raise ValueError(f"fixed must be [X, Y, Z], got shape {shape}")
  checks = [("moving", moving, shape), ("warped", warped, shape), ("disp", disp, shape + (3,))]
  if fixed_labels is not None:
    checks.append(("fixed_labels", fixed_labels, shape))
  for name, a, want in checks:
    if tuple(np.shape(a)) != want:
      raise ValueError(f"{name} has shape {np.shape(a)}, expected {want} (fixed has {shape})")
  views = _plane_images(fixed, moving, warped, disp, affine, fixed_labels)
  columns = ("fixed", "moving", "warped", "fixed - warped") + \
      (("fixed labels on warped",) if fixed_labels is not None else ()) + \
      ("checkerboard", "deformation grid", "det J")
  image, layout = _render(views, columns, window=window, grid_every=grid_every,
                          diff_range=diff_range)
  width = image.shape[1]
  text = _Text(image)
  text(width / 2, 8, title or "jaxreg registration (radiological view: patient right on "
       "the left)", anchor="mt", fontsize=13)
  for column, (left, w) in layout["columns"].items():
    text(left + w / 2, _TOP - 9, column, anchor="ms", fontsize=11)  # one baseline
  for plane, (top, h) in layout["rows"].items():
    text(_LEFT / 2, top + h / 2, plane, fontsize=11, rotate=True)
  for column, (top, left, w) in layout["keys"].items():
    ticks = _keys(window, diff_range)[column][3]
    for x, s in zip((left, left + w / 2, left + w), ticks):
      text(x, top + 12, s, anchor="mt", fontsize=9)
  with _io.atomic_path(path, suffix=".png") as tmp:
    # zlib level 1: 3x faster than the default 6 on this raster, ~15% larger file
    text.canvas.save(tmp, format="PNG", compress_level=1)


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
