"""Fitting a purified model from data, stage by stage.

- :mod:`~purenn.fit.data`: :class:`~purenn.fit.data.DataSource`, one way to read any dataset, loader or tensor;
- :mod:`~purenn.fit.collect`: the streaming pass that keeps every neuron's top-n reference samples;
- :mod:`~purenn.fit.circuits`, :mod:`~purenn.fit.gate_features`: the gate's features at the references
  (circuit relevance of (sample, neuron) pairs; forward-only features);
- :mod:`~purenn.fit.cluster`: :class:`~purenn.fit.cluster.CircuitKMeans`, polysemanticity scores;
- :mod:`~purenn.fit.plan`, :mod:`~purenn.fit.stages`, :mod:`~purenn.fit.pipeline`: the validated plan, the
  named stages and :func:`~purenn.fit.pipeline.purify_model` that runs them;
- :mod:`~purenn.fit.concept`: :func:`~purenn.fit.concept.purify_concept` (one concept against the rest);
- :mod:`~purenn.fit.resume`, :mod:`~purenn.fit.refcheck`: resumable runs and the reference-data record.
"""
