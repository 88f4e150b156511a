"""Paper scale: 2 mm whole-body CT pairs from a CSV or Learn2Reg folder, a full-size UNet.

Run: python train.py --config configs/default.py --workdir runs/wholebody \
       --config.data.source='csv' --config.data.path='/data/pairs.csv'

TotalRegistrator trains on 2 mm thorax-abdomen-pelvis CT in 11 GB of GPU memory;
our shape and widths are our choice (the paper's exact network is not public).
Expect an accelerator: a train step at this size takes minutes on a CPU.
"""

from jaxreg.configs import demo


def get_config():
  c = demo.get_config()
  c.data.source = "csv"
  c.data.path = ""  # required: --config.data.path=...
  c.data.spacing = 2.0
  # 384 x 320 x 512 mm field of view, cropped/padded about the fixed image's centre.
  c.data.shape = (192, 160, 256)
  # TotalSegmentator ids of organs with labels, if the data has them: spleen,
  # kidneys, gallbladder, liver, stomach, pancreas, lung lobes, heart, aorta.
  c.data.label_ids = (1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 51, 52)
  c.data.val_pairs = 8
  c.data.workers = 4
  c.data.augment.swap = 0.5
  c.data.augment.gamma = 0.1
  c.model.widths = (16, 32, 64, 128, 128)
  c.model.convs_per_level = 2
  c.model.num_subfields = 4
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 1000
  c.train.steps = 100_000
  c.train.batch_size = 1
  c.train.log_every = 100
  c.train.eval_every = 2000
  c.train.checkpoint_every = 2000
  c.train.keep_last = 3
  c.train.keep_best = 2
  return c
