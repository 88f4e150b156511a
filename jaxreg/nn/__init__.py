"""The network: a Flax NNX UNet with K sub-field heads (:mod:`jaxreg.nn.model`), the
depth-folded 3-D convolution that makes it fast on XLA:CPU (:mod:`jaxreg.nn.conv`), and
the input channels it takes (:mod:`jaxreg.nn.inputs`)."""
