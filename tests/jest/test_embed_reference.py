"""Precomputed reference embeddings: cached scores match the live reference, and JEST trains without it."""

from __future__ import annotations

import json

import torch
from model_helpers import fit, make_model, series

from composer_jest import JEST, jest_select
from composer_jest.core.batch import CACHED_REFERENCE_KEYS
from composer_jest.core.losses import sigmoid_pair_loss
from composer_jest.data.convert import convert_shapes
from composer_jest.data.streaming import build_streaming_dataloader
from composer_jest.jest.embed_reference import embed_reference
from composer_jest.jest.reference import load_reference


def test_cached_reference_matches_live_and_replaces_it(trained_reference, tokenizer, tmp_path):
    _, checkpoint = trained_reference
    convert_shapes(str(tmp_path / 'shapes'), num_samples=256, noise=0.5, seed=4)
    meta = embed_reference('jest-tiny', str(checkpoint), str(tmp_path / 'embedded'), local=str(tmp_path / 'shapes'),
                           batch_size=100, progress=False)
    assert meta['num_samples'] == 256
    assert json.loads((tmp_path / 'embedded' / 'reference.json').read_text())['checkpoint'] == str(checkpoint)

    loader = build_streaming_dataloader(None, str(tmp_path / 'embedded'), tokenizer, batch_size=64,
                                        shuffle=False)
    batch = next(iter(loader))
    assert all(k in batch for k in CACHED_REFERENCE_KEYS)
    assert batch['ref_image_features'].dtype == torch.float16 and batch['image'].shape[0] == 64

    live = load_reference(str(checkpoint), default_model='jest-tiny')
    with torch.no_grad():
        ref = live(batch['image'], batch['text'])
    cached = {'image_features': batch['ref_image_features'].float(),
              'text_features': batch['ref_text_features'].float(),
              'logit_scale': batch['ref_logit_scale'][0], 'logit_bias': batch['ref_logit_bias'][0]}
    assert torch.allclose(cached['image_features'], ref['image_features'], atol=2e-3)
    assert torch.allclose(cached['logit_scale'], ref['logit_scale'].reshape(()))
    live_loss = sigmoid_pair_loss(**ref)
    cached_loss = sigmoid_pair_loss(**cached)
    # float16 features (3 significant digits) times a logit scale of ~10-20: pair losses agree to ~0.05
    assert (live_loss - cached_loss).abs().max() < 0.05

    learner = make_model(seed=2).eval()
    with torch.no_grad():
        learner_features = learner(batch)
    agree = []
    for seed in range(5):
        a = jest_select(learner_features, ref, 32, n_chunks=4, generator=torch.Generator().manual_seed(seed)).indices
        b = jest_select(learner_features, cached, 32, n_chunks=4, generator=torch.Generator().manual_seed(seed)).indices
        agree.append(len(set(a.tolist()) & set(b.tolist())) / 32)
    assert sum(agree) / len(agree) > 0.9, agree

    # Training from the embedded shards needs no reference model at all.
    jest = JEST(reference='cached', filter_ratio=0.5, n_chunks=4, track_keys=('clean',), seed=0)
    train_loader = build_streaming_dataloader(None, str(tmp_path / 'embedded'), tokenizer, batch_size=64,
                                              shuffle=True, shuffle_seed=1)
    _, logger = fit(make_model(seed=3), train_loader, steps=3, algorithms=[jest], warmup=1)
    assert jest.reference is None
    assert series(logger, 'jest/examples_trained')[-1] == 3 * 32
    assert sum(series(logger, 'jest/selected/clean')) > sum(series(logger, 'jest/superbatch/clean'))
