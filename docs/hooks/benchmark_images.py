"""mkdocs hook: serve the plots in ``benchmarks/*.png`` as ``img/NAME.png`` without copying them.

The benchmark scripts write their plots beside themselves; the benchmarks page links
``img/NAME.png``, and this hook adds each plot to the site's files under that name.
"""

from __future__ import annotations

import glob
import os

from mkdocs.structure.files import File

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def on_files(files, config):
  for path in sorted(glob.glob(os.path.join(_ROOT, "benchmarks", "*.png"))):
    files.append(File.generated(config, f"img/{os.path.basename(path)}", abs_src_path=path))
  return files
