"""The CAM engine.  No files, no Ray.

* :mod:`audit.engine.graph`: tracing, nested models, target-layer choice;
* :mod:`audit.engine.heads`: the classifier head (:class:`~audit.engine.heads.Head`) and class names;
* :mod:`audit.engine.explainer`: the :class:`~audit.engine.explainer.Explainer`, its compiled step and batching;
* :mod:`audit.engine.methods`: one module per CAM method and the registry;
* :mod:`audit.engine.models`, :mod:`audit.engine.stats`: loading models, per-map statistics.
"""
