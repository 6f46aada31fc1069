"""Shared ground of every layer: option names (:mod:`~purenn.common.choices`), scalar checks
(:mod:`~purenn.common.checks`), progress bars (:mod:`~purenn.common.progress`) and the process-group
primitives of torch.distributed (:mod:`~purenn.common.distributed`). Imports nothing of purenn but
:mod:`purenn.errors`; :mod:`~purenn.common.choices` and :mod:`~purenn.common.checks` import no torch.
"""
