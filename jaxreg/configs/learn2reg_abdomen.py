"""Learn2Reg AbdomenCTCT (2 mm, 192 x 160 x 256, 13 organ labels), the Learn2Reg folder layout.

Run: python train.py --config configs/learn2reg_abdomen.py --workdir runs/abdomen \
       --config.data.path=/data/AbdomenCTCT
"""

from jaxreg.configs import default


def get_config():
  c = default.get_config()
  c.data.source = "learn2reg"
  c.data.path = ""  # required: the folder holding AbdomenCTCT_dataset.json
  # Learn2Reg's 13 abdominal organs (spleen, kidneys, gallbladder, oesophagus, liver,
  # stomach, aorta, IVC, portal/splenic vein, pancreas, adrenal glands), ids 1..13.
  c.data.label_ids = tuple(range(1, 14))
  c.data.val_pairs = 6
  c.data.breathing_mm = 0.0  # synthetic-pair settings are unused with real pairs
  return c
