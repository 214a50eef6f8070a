"""Retrieval recall on templated captions: identical captions are one retrieval target."""

from __future__ import annotations

import pytest
import torch
from model_helpers import make_model

from composer_jest.models.clip import RetrievalRecall, caption_groups

CLASSES = ('circle', 'square', 'triangle', 'star')


def templated_eval_set(repeats: int = 25, mismatched: int = 4, seed: int = 0):
    """4 captions x ``repeats`` images. Text features of one caption are equal up to 1e-3 (as when computed in
    different batches); each image points at its caption's direction, except the first ``mismatched`` images
    (caption 0), which point, weaker, at caption 1's."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.eye(16)[:len(CLASSES)]
    caption = torch.arange(len(CLASSES)).repeat_interleave(repeats)
    n = caption.numel()
    target, strength = caption.clone(), torch.ones(n)
    target[:mismatched], strength[:mismatched] = 1, 0.5
    image = directions[target] * strength[:, None] + 0.01 * torch.randn(n, 16, generator=g)
    text = directions[caption] + 1e-3 * torch.randn(n, 16, generator=g)
    return image, text, caption


@pytest.mark.parametrize(('direction', 'k', 'expected'), [
    ('image_to_text', 1, 0.96),  # the 4 mismatched images rank caption 1 first
    ('image_to_text', 5, 1.0),   # only 4 distinct captions: every image finds its own within 5
    ('text_to_image', 1, 1.0),   # every caption's best image is one of its own (the mismatched ones score 0.5)
])
def test_repeated_captions_count_as_one_target(direction, k, expected):
    image, text, caption = templated_eval_set()
    grouped, exact = RetrievalRecall(direction, k), RetrievalRecall(direction, k)
    for half in (slice(0, 50), slice(50, 100)):  # two eval batches
        grouped.update(image[half], text[half], groups=caption[half] * 1000 + 7)
        exact.update(image[half], text[half])
    assert float(grouped.compute()) == pytest.approx(expected)
    if k == 1:  # the exact-index rule asks to tell 25 identical captions apart: ~1/25 for any model
        assert float(exact.compute()) < 0.12


def test_clip_model_groups_eval_captions_by_token_ids():
    model = make_model()
    image, text, caption = templated_eval_set()
    tokens = model.tokenizer([f'a photo of a {CLASSES[c]}' for c in caption.tolist()])
    metrics = {name: m for name, m in model.get_metrics().items() if isinstance(m, RetrievalRecall)}
    for half in (slice(0, 50), slice(50, 100)):
        batch = {'image': torch.zeros(50, 3, 32, 32), 'text': tokens[half]}
        outputs = {'image_features': image[half], 'text_features': text[half]}
        for metric in metrics.values():
            model.update_metric(batch, outputs, metric)
    values = {name: round(float(m.compute()), 4) for name, m in metrics.items()}
    assert values == {'ImageToTextRecall@1': 0.96, 'ImageToTextRecall@5': 1.0, 'TextToImageRecall@1': 1.0,
                      'TextToImageRecall@5': 1.0}


def test_caption_groups_are_equal_exactly_for_equal_token_ids():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 49408, (2000, 12), generator=g)
    ids[1000:, 6:] = 0  # padded captions
    assert caption_groups(ids).unique().numel() == 2000
    padded = torch.cat([ids, torch.zeros(2000, 65, dtype=torch.long)], 1)  # a longer context: same captions
    assert torch.equal(caption_groups(padded), caption_groups(ids))
    swapped = ids.clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]  # same tokens, other order: another caption (unless they are equal)
    assert torch.equal(caption_groups(swapped) == caption_groups(ids), ids[:, 0] == ids[:, 1])
