"""What a purified model tells: linear probes on pure features (:mod:`~purenn.analysis.probe`),
disentanglement and polysemanticity metrics (:mod:`~purenn.analysis.metrics`), unlearning and shortcut
reports (:mod:`~purenn.analysis.unlearn`), figures (:mod:`~purenn.analysis.viz`) and the HTML report
(:mod:`~purenn.analysis.report`).
"""
