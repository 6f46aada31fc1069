"""Circuit relevance as plain forward ops: the rules (:mod:`~purenn.attribution.rules`: PURE's gradient
and zennit's LRP rules), the explicit segment backward and :func:`~purenn.attribution.relevance.circuit_relevance`
(:mod:`~purenn.attribution.relevance`), and the arithmetic of the relevance stage
(:mod:`~purenn.attribution.precision`). Builds on :mod:`purenn.arch` only.
"""
