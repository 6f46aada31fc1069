"""Option values shared by the API and the ``purenn`` command, in a module that imports nothing.

The command builds its parser from these without importing torch or scikit-learn, so that
``purenn --help`` starts fast. :mod:`purenn.gating` and :mod:`purenn.cluster` re-export them.
"""

__all__ = ["GATES", "PRECISIONS", "SCORES", "MAX_DPI", "RULES"]

#: what selects a purified neuron's virtual neuron (see :mod:`purenn.gating`); the first two use circuits
GATES = ("circuit", "circuit+map", "activation", "upstream", "map")
#: polysemanticity scores of :class:`purenn.cluster.CircuitKMeans`
SCORES = ("silhouette", "contrast")
#: the highest resolution a figure is drawn at (one at a higher dpi needs gigabytes)
MAX_DPI = 1200
#: arithmetic of the relevance stage (see :mod:`purenn.precision`)
PRECISIONS = ("float32", "tf32", "bf16")
#: relevance rules of :mod:`purenn.rules` (PURE's gradient, then zennit's LRP rules)
RULES = ("gradient", "epsilon", "zplus", "alpha2beta1", "gamma")
