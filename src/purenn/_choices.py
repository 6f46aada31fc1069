"""Option values shared by the API and the ``purenn`` command, in a module that imports nothing.

The command builds its parser from these without importing torch or scikit-learn, so that
``purenn --help`` starts fast. :mod:`purenn.gating` and :mod:`purenn.cluster` re-export them.
"""

__all__ = ["GATES", "SCORES", "RULES"]

#: what selects a purified neuron's virtual neuron (see :mod:`purenn.gating`); the first two use circuits
GATES = ("circuit", "circuit+map", "activation", "upstream", "map")
#: polysemanticity scores of :class:`purenn.cluster.CircuitKMeans`
SCORES = ("silhouette", "contrast")
#: relevance rules of :mod:`purenn.rules` (PURE's gradient, then zennit's LRP rules)
RULES = ("gradient", "epsilon", "zplus", "alpha2beta1", "gamma")
