"""The shipped demo model (jaxreg/demo_model): 6 mm (64³, the same field of view as configs/demo.py),
conditioned on the regularisation weight, trained on more varied synthetic families.

Run: python train.py --config configs/demo_6mm.py --workdir runs/demo_6mm --steps 2700
(76 min on 2 CPU cores; the shipped weights are that run, exported by jaxreg.training.export_checkpoint)
"""

from jaxreg.configs import demo


def get_config():
  c = demo.get_config()
  c.data.spacing = 6.0
  c.data.shape = (64, 64, 64)
  # more varied families: multi-scale motion, residual rigid misalignment, cut fields of view
  c.data.fine_disp_mm = 5.0
  c.data.fine_spacing_mm = 25.0
  c.data.rigid_deg = 4.0
  c.data.rigid_mm = 8.0
  c.data.crop = 0.15
  c.model.condition_on_reg = True
  c.model.reg_conditioning = "film"
  c.model.reg_range = (0.1, 100.0)
  return c
