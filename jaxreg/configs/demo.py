"""Demo: the embedded chest/abdomen CT, synthetic pairs, a UNet that trains on 2 CPU cores.

Run: python train.py --config configs/demo.py --workdir runs/demo
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # Seed of the network initialisation and of everything random in training.
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # "demo" (synthetic pairs from the embedded CT), "learn2reg" or "csv".
  c.data.source = "demo"
  # Learn2Reg folder or pairs CSV (source "learn2reg" / "csv").
  c.data.path = ""
  # Model-grid voxel size, mm (isotropic, RAS-aligned).
  c.data.spacing = 8.0
  # Model-grid shape (X, Y, Z); every axis a multiple of the UNet stride. None: fit the
  # fixed image's field of view (then all pairs must give the same shape to batch).
  c.data.shape = (48, 48, 48)
  # Hounsfield window, clipped and scaled to [0, 1].
  c.data.hu_window = (-1000.0, 1000.0)
  # Label ids used for the Dice loss and validation Dice (TotalSegmentator ids:
  # spleen, kidneys R/L, liver, stomach, lung lobes, heart, aorta).
  c.data.label_ids = (1, 2, 3, 5, 6, 10, 11, 12, 13, 14, 51, 52)
  # Synthetic pairs: largest random smooth displacement (mm), its control-point
  # spacing (mm), largest breathing shift (mm), contrast change, noise (HU).
  c.data.max_disp_mm = 15.0
  c.data.control_spacing_mm = 60.0
  c.data.breathing_mm = 10.0
  c.data.contrast = 0.1
  c.data.noise_hu = 10.0
  # Optional families (0: off): a second, finer smooth component (mm, control spacing mm)
  # for multi-scale motion, and a residual rigid misalignment (deg per axis, mm per axis).
  c.data.fine_disp_mm = 0.0
  c.data.fine_spacing_mm = 20.0
  c.data.rigid_deg = 0.0
  c.data.rigid_mm = 0.0
  # Random field-of-view cut of the fixed image: up to this fraction of each axis (0: off).
  c.data.crop = 0.0
  # Held-out validation pairs (evaluation seeds, disjoint from training seeds).
  c.data.val_pairs = 4
  # The data pipeline (Grain): worker processes that read and prepare examples (numpy only;
  # 0: in the training process, between steps), and the examples each prepares ahead.
  # Resume a run with the same number of workers.
  c.data.workers = 1
  c.data.prefetch = 2
  # Pairs that cannot be read (missing, truncated, not a CT) are skipped with a warning;
  # the run stops once more than this fraction of the training pairs failed.
  c.data.max_bad_fraction = 0.1
  # Random changes to each training example (0: off): exchange fixed and moving with this
  # probability, gamma exp(U[-g, g]) on each image's [0, 1] intensities, Gaussian noise.
  c.data.augment = ml_collections.ConfigDict(dict(swap=0.0, gamma=0.0, noise=0.0))

  c.model = ml_collections.ConfigDict()
  # UNet channels per level (level i has 1/2**i of the resolution).
  c.model.widths = (16, 32, 32, 32)
  # UNet convolutions per level.
  c.model.convs_per_level = 1
  # Convolution formulation: "auto" (depth-folded 2-D convolutions on CPU, where they
  # are 3-25x faster; native on accelerators), "native" or "folded".
  c.model.conv = "auto"
  # K, the number of sub-fields; "levels": one per decoder level (coarse to fine),
  # "full": K heads at full resolution.
  c.model.num_subfields = 3
  c.model.heads = "levels"
  # Bound on each sub-field's magnitude (voxels of its grid); None: unbounded.
  c.model.max_disp = None
  # Std of the heads' initial weights (near-identity start).
  c.model.head_init = 1e-5
  # Also feed the organ masks of both images (data.label_ids, one-hot) as input channels;
  # such a model needs both label maps at inference too.
  c.model.label_inputs = False
  # Amortised regularisation (HyperMorph-style): draw lambda per example, log-uniform
  # over reg_range, give it to the network ("film": per-level feature scale and shift;
  # "channel": a constant input channel) and weight the regulariser by it. Then
  # `jaxreg register --reg-weight L` picks the trade-off without retraining; validation
  # uses loss.reg_weight as lambda.
  # Rematerialise each UNet level in the backward pass (less memory, more compute).
  c.model.remat = False
  c.model.condition_on_reg = False
  c.model.reg_conditioning = "film"
  c.model.reg_range = (0.1, 100.0)

  # How the sub-fields are combined: "compose" (the method), "sum", "svf".
  c.decomposition = "compose"
  # Scaling-and-squaring steps for "svf".
  c.svf_steps = 7

  c.loss = ml_collections.ConfigDict()
  # Image similarity loss: "lncc" (local NCC), "ncc" (global), "mse", "mind"
  # (MIND-SSC), or a name registered with jaxreg.ops.losses.register_similarity
  # (train.py --import MODULE), called as fn(fixed, warped, **similarity_kwargs).
  c.loss.similarity = "lncc"
  c.loss.similarity_kwargs = ml_collections.ConfigDict()
  # LNCC window, voxels.
  c.loss.window = 9
  c.loss.sim_weight = 1.0
  # Smoothness regulariser: "diffusion", "bending", or a name registered with
  # jaxreg.ops.losses.register_regulariser, called as fn(disp, **reg_kwargs) on
  # [X, Y, Z, 3] voxel fields; weighted on the mean over sub-fields and on the
  # total field.
  c.loss.reg = "diffusion"
  c.loss.reg_kwargs = ml_collections.ConfigDict()
  c.loss.reg_weight = 0.5
  c.loss.total_reg_weight = 0.5
  # Soft Dice of warped one-hot labels (weak supervision; 0 disables it).
  c.loss.dice_weight = 1.0
  # Penalty on non-positive Jacobian determinants of the total field.
  c.loss.folding_weight = 0.0

  c.optim = ml_collections.ConfigDict()
  # Adam peak learning rate, linear warm-up steps, cosine decay to lr * end_lr_fraction.
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.end_lr_fraction = 0.05
  # Global gradient-norm clipping.
  c.optim.clip_norm = 1.0

  c.train = ml_collections.ConfigDict()
  # Optimisation steps and global batch size (a multiple of the device count).
  c.train.steps = 900
  c.train.batch_size = 1
  # Compute dtype of the network's convolutions (inputs, activations): "float32" or
  # "bfloat16" (mixed precision: parameters, optimiser state, fields and losses stay float32).
  c.train.compute_dtype = "float32"
  # Recompute the objective outside the UNet (composition, warps, similarity, soft Dice) in the
  # backward pass instead of keeping its intermediates: less memory, a slower step.
  c.train.remat_loss = False
  # Devices to train on: 0 = all devices (of all processes), N = the first N.
  c.train.devices = 0
  # The device mesh over those devices: `data` devices split the batch (0: all that `space`
  # leaves), `space` devices split each volume's first spatial axis X (spatial sharding, for
  # volumes too large for one device; data.shape[0] must be a multiple of it).
  c.mesh = ml_collections.ConfigDict({"data": 0, "space": 1})
  # Log train metrics, run validation and save a checkpoint every so many steps.
  c.train.log_every = 25
  c.train.eval_every = 150
  c.train.checkpoint_every = 150
  # Checkpoints kept: the latest N, and the best N by validation loss.
  c.train.keep_last = 2
  c.train.keep_best = 1
  return c
