"""The register pipeline, stage by stage (:mod:`jaxreg.pipeline.register`): the affine stage
(:mod:`jaxreg.pipeline.affine`), the network, the refinement up to the image's resolution
(:mod:`jaxreg.pipeline.refine`), the outputs (:mod:`jaxreg.pipeline.outputs`) and their
report (:mod:`jaxreg.pipeline.report`); the opt-in cross-process stage cache
(:mod:`jaxreg.pipeline.stages`), compilation counting (:mod:`jaxreg.pipeline.compilation`)
and what the entry points read from the environment (:mod:`jaxreg.pipeline.environment`)."""
