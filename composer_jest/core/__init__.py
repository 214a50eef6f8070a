"""core: the math of JEST, pure torch — no Composer, no I/O, no open_clip.

Owns: the batch schema and the ``Features`` of a super-batch (``batch``), the model contract JEST scores through
(``contract``, a ``Protocol``), the pair losses and objectives (``losses``, ``objectives``; false negatives and the
negatives queue in ``negatives``), the chunked Gumbel-top-k samplers (``selection``), the matrix-free conditional
scorers (``blockwise``) behind ``jest_select`` (``scoring``), and the functional selection step (``step``:
``select_step``, features in -> indices and statistics out). Tested against brute force.

May import: torch and the standard library only (and itself). Nothing in ``composer_jest`` outside ``core``.
"""
