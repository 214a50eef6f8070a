"""core: the math of JEST, pure torch — no Composer, no I/O, no open_clip.

Owns: the batch schema (``batch``), the model contract JEST scores through (``contract``, a ``Protocol``), the
pair losses and objectives (``losses``, ``objectives``, ``negatives``), the conditional scores and the chunked
Gumbel-top-k samplers (``scoring``, ``selection``). Tested against brute force.

May import: torch and the standard library only (and itself). Nothing in ``composer_jest`` outside ``core``.
"""
