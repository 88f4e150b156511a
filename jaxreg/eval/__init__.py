"""Evaluating methods on pairs (:mod:`jaxreg.eval.evaluation`, ``evaluate.py``'s library) and
the classical baselines it compares against: elastix B-spline (:mod:`jaxreg.eval.elastix`)
and SimpleITK demons (:mod:`jaxreg.eval.demons`)."""
