"""A tiny CPU config for tests: 16^3 synthetic pairs, a 3-level UNet, a few steps."""

from jaxreg.configs import demo


def get_config():
  c = demo.get_config()
  c.data.spacing = 20.0
  c.data.shape = (16, 16, 16)
  c.data.label_ids = (5, 51)  # liver, heart
  c.data.val_pairs = 2
  c.data.max_disp_mm = 20.0
  c.data.workers = 0  # 16^3 examples: a worker process would cost more than it saves
  c.model.widths = (8, 8, 8)
  c.model.num_subfields = 2
  c.loss.window = 5
  c.optim.warmup_steps = 2
  c.train.steps = 4
  c.train.batch_size = 8
  c.train.log_every = 1
  c.train.eval_every = 2
  c.train.checkpoint_every = 2
  return c
