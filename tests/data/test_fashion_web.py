"""The heterogeneous Fashion-MNIST web pool (needs the Debian package ``dataset-fashion-mnist``)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from composer_jest.data.demo.fashion_mnist import CLASSNAMES, WebNoise, fashion_mnist_root
from composer_jest.data.demo.fashion_web import (
    CORNERS,
    Attributes,
    FashionWebCaptions,
    LongTail,
    canonical_caption,
    zero_shot_classnames,
)

NOISE = WebNoise(mismatched=0.25, junk=0.15, near_duplicate=0.15)
TAIL = LongTail(rare_classes=(2, 4, 6, 9), rare_weight=0.1, popular_per_class=4)


@pytest.fixture(scope='module', autouse=True)
def fashion_mnist_files():
    try:
        return fashion_mnist_root()
    except FileNotFoundError as e:
        pytest.fail(f'Fashion-MNIST is not installed, so its builder cannot be tested: {e}', pytrace=False)


@pytest.fixture(scope='module')
def pool_examples():
    pool = FashionWebCaptions('train', num_samples=3000, noise=NOISE, long_tail=TAIL, seed=0)
    return pool, [pool.example(i) for i in range(len(pool))]


def _main_name(caption: str) -> set[int]:
    found = {i for i, name in enumerate(CLASSNAMES) if name in caption}
    if 0 in found:  # 'shirt' inside 't-shirt'
        found.discard(6) if caption.count('shirt') == 1 else None
    return found


def test_pure_function_of_seed_and_index(pool_examples):
    pool, examples = pool_examples
    again = FashionWebCaptions('train', num_samples=3000, noise=NOISE, long_tail=TAIL, seed=0)
    other = FashionWebCaptions('train', num_samples=3000, noise=NOISE, long_tail=TAIL, seed=1)
    for i in (0, 5, 2999):
        a, b = examples[i], again.example(i)
        assert a['caption'] == b['caption'] and a['attributes'] == b['attributes']
        assert np.array_equal(np.asarray(a['image']), np.asarray(b['image']))
    assert [e['caption'] for e in examples[:50]] != [other.example(i)['caption'] for i in range(50)]
    assert examples[0]['image'].size == (32, 32) and examples[0]['image'].mode == 'L'
    with pytest.raises(IndexError):
        pool.example(3000)


def test_noise_mix_and_long_tail(pool_examples):
    pool, examples = pool_examples
    kinds = Counter(e['kind'] for e in examples)
    for kind, fraction in (('mismatched', 0.25), ('junk', 0.15), ('near_duplicate', 0.15), ('clean', 0.45)):
        assert abs(kinds[kind] / len(examples) - fraction) < 0.03, kinds
    labels = Counter(e['label'] for e in examples if e['kind'] == 'clean')
    common = np.mean([labels[c] for c in TAIL.common_classes])
    for c in TAIL.rare_classes:
        assert labels[c] < 0.25 * common, labels
    # near duplicates copy few popular images of common classes, with the original's attributes
    dups = [e for e in examples if e['duplicate']]
    assert {e['label'] for e in dups} <= set(TAIL.common_classes)
    assert len({e['source'] for e in dups}) <= 4 * len(TAIL.common_classes)
    by_source = {}
    for e in dups:
        by_source.setdefault(e['source'], set()).add(e['canonical'])
    assert all(len(v) == 1 for v in by_source.values())
    assert all(e['rare'] == (e['label'] in TAIL.rare_classes) for e in examples)


def test_captions_name_the_item_and_its_attributes(pool_examples):
    _, examples = pool_examples
    for e in examples[:500]:
        caption, attrs = e['caption'], e['attributes']
        if e['kind'] == 'junk':
            assert not any(name in caption for name in CLASSNAMES), caption
            continue
        if e['kind'] == 'mismatched':
            assert CLASSNAMES[e['label']] not in caption.split(' with ')[0].split(' next to ')[0].split(' and ')[0]
            continue
        assert CLASSNAMES[e['label']] in caption, caption
        if attrs.small and 'the ' + CORNERS[attrs.corner] not in caption:
            assert not any('the ' + c in caption for c in CORNERS), caption  # a corner is named only if right
        if 'negative' in caption or 'white background' in caption:
            assert attrs.inverted
        if 'upside-down' in caption or 'flipped' in caption:
            assert attrs.orientation == 'upside-down'
    # rendered attributes: inverted images are mostly white, small items leave the opposite corner dark
    inv = [np.asarray(e['image']).mean() for e in examples if e['attributes'].inverted]
    plain = [np.asarray(e['image']).mean() for e in examples if not e['attributes'].inverted]
    assert np.mean(inv) > 150 > 80 > np.mean(plain)


def test_captions_are_varied(pool_examples):
    _, examples = pool_examples
    captions = [e['caption'] for e in examples if e['kind'] != 'junk']
    assert len(set(captions)) > 0.6 * len(captions)
    counts = Counter(captions)
    assert counts.most_common(1)[0][1] < 0.01 * len(captions)


def test_curated_and_evaluation_sets():
    curated = FashionWebCaptions.curated(200, seed=3)
    examples = [curated.example(i) for i in range(len(curated))]
    assert all(e['kind'] == 'clean' and not e['duplicate'] for e in examples)
    assert sorted(Counter(e['label'] for e in examples).values()) == [20] * 10
    assert len({e['source'] for e in examples}) == 200
    ev = FashionWebCaptions.evaluation(100, seed=2)
    assert ev.split == 'test' and len(ev) == 100
    e = ev.example(7)
    assert e['canonical'] == canonical_caption(e['label'], e['attributes'])
    assert CLASSNAMES[e['label']] in e['canonical']
    assert len(zero_shot_classnames()) == 10 and zero_shot_classnames()[9] == 'an ankle boot'


def test_validation():
    with pytest.raises(ValueError, match='rare_weight'):
        LongTail(rare_weight=0.0)
    with pytest.raises(ValueError, match='orientation'):
        Attributes(orientation=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match='num_samples'):
        FashionWebCaptions('test', num_samples=20000)
    assert len(FashionWebCaptions('test', num_samples=20000, long_tail=LongTail())) == 20000
