"""Images in and out: NIfTI (and NRRD, MetaImage, DICOM with the ``itk`` extra), atomic
writes, putting images on one grid and mapping fields back, model weights.

* :mod:`jaxreg.io.nifti`: :func:`load`, :func:`load_labels`, :func:`save`,
  :func:`save_displacement`, :func:`load_displacement` (the ITK/ANTs/Slicer convention).
* :mod:`jaxreg.io.itk`: NRRD, MetaImage and DICOM series through SimpleITK.
* :mod:`jaxreg.io.atomic`: outputs that appear whole or not at all.
* :mod:`jaxreg.io.resample`: the model grid, resampling, mapping a field back to an
  image's own grid.
* :mod:`jaxreg.io.weights`: save and load a trained model; the shipped demo model.
* :mod:`jaxreg.io.configjson`: configs as JSON beside checkpoints and weights.
* :mod:`jaxreg.io.interrupt`: SIGTERM handled like Ctrl-C, so nothing is half written.

Arrays are numpy ``[X, Y, Z]`` with a ``[4, 4]`` voxel-to-world affine (RAS+ mm).
"""

from jaxreg.io.atomic import atomic_dir as atomic_dir
from jaxreg.io.atomic import atomic_path as atomic_path
from jaxreg.io.atomic import check_output_dir as check_output_dir
from jaxreg.io.atomic import output_lock as output_lock
from jaxreg.io.nifti import CONVENTIONS as CONVENTIONS
from jaxreg.io.nifti import check_same_grid as check_same_grid
from jaxreg.io.nifti import load as load
from jaxreg.io.nifti import load_displacement as load_displacement
from jaxreg.io.nifti import load_labels as load_labels
from jaxreg.io.nifti import reindexed as reindexed
from jaxreg.io.nifti import save as save
from jaxreg.io.nifti import save_displacement as save_displacement

__all__ = [
    "load",
    "load_labels",
    "save",
    "save_displacement",
    "load_displacement",
    "check_same_grid",
    "reindexed",
    "atomic_path",
    "atomic_dir",
    "output_lock",
    "check_output_dir",
    "CONVENTIONS",
]
