"""models: the learner as open_clip models it — towers, flexi patch sizes, packed calls, FLOP counting.

Owns: ``CLIPModel`` / ``CLIPTowers`` (``clip``), FlexiViT patch resizing (``flexi``), several groups of sequences
through one transformer call (``packed``), the MoCo negatives queue (``negatives``), caption-length buckets
(``text_buckets``), published weights
(``pretrained``), safe checkpoint loading (``checkpoint``), analytic FLOPs (``flops``).

May import: ``composer_jest.core``, torch, open_clip, timm, Composer's model base classes. Never ``data``,
``jest`` or ``run``.
"""
