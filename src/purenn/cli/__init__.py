"""The ``purenn`` command (:mod:`~purenn.cli.app`, with :mod:`~purenn.cli.report` and
:mod:`~purenn.cli.unlearn`), its model and data loaders (:mod:`~purenn.cli.loaders`), the demo
(:mod:`~purenn.cli.demo`) and the Fashion-MNIST and synthetic datasets that only the demo, the
examples and the benchmarks use (:mod:`~purenn.cli.datasets`). Nothing below this layer imports it.
"""

from purenn.cli.app import build_parser, main

__all__ = ["main", "build_parser"]
