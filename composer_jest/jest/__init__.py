"""jest: the Composer side of selection — the JEST algorithm, the frozen reference, score inputs, callbacks.

Owns: ``JEST`` (``algorithm``: a thin adapter from Composer's ``State`` to the functional selection step), the
reference model or its cached columns (``reference``), a live reference's columns for the steered losses
(``reference_features``), the features a super-batch is scored with
(``score_inputs``), two-stage decoding's checks and stage 2 (``full_res``), ``SelectionLog`` (``callbacks``),
``composer-jest embed-reference`` (``embed_reference``).

May import: ``core``, ``models``, ``data``, Composer. Never ``run``.
"""
