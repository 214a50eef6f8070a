"""run: from a yaml (or the command line) to a finished fit.

Owns: the structured config (``config``), the registries a yaml names (``registry``), config -> Trainer
(``builders``), the train entry (``train``), the default comparison (``quickstart``), the ``composer-jest`` CLI
(``cli``), what a run prints (``console``), optimizers (``optim``), and the recipes (``yamls/``).

May import: everything below it (``jest``, ``data``, ``models``, ``core``). Nothing imports ``run``.
"""
