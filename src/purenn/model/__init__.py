"""The purified model: gate signals (:mod:`~purenn.model.gates`), :class:`~purenn.model.pure_layer.PureLayer`
(relevance -> gate -> virtual neurons -> merge, :mod:`~purenn.model.pure_layer`) and
:class:`~purenn.model.purified.PurifiedModel` (the block-by-block replay with pure layers, suppression,
:mod:`~purenn.model.purified`). Builds on :mod:`purenn.attribution` and :mod:`purenn.arch`.
"""
