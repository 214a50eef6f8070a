"""Fashion-MNIST image–caption builder (needs the Debian package ``dataset-fashion-mnist``).

These tests FAIL, rather than skip, when the files are missing: install them with
``apt-get install dataset-fashion-mnist`` (``.ci/run`` does so where it can).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from s3_server import streaming_shm  # noqa: F401  (pytest fixture)

from composer_jest.data.convert import MDSOptions, convert_fashion_mnist
from composer_jest.data.demo.fashion_mnist import (
    CLASSNAMES,
    FashionMNISTCaptions,
    WebNoise,
    fashion_mnist_classnames,
    fashion_mnist_root,
    load_fashion_mnist,
)
from composer_jest.data.streaming import build_streaming_dataloader

NOISE = WebNoise(mismatched=0.2, junk=0.1, near_duplicate=0.1, duplicate_pool=20)


@pytest.fixture(scope='module', autouse=True)
def fashion_mnist_files():
    try:
        return fashion_mnist_root()
    except FileNotFoundError as e:
        pytest.fail(f'Fashion-MNIST is not installed, so its builder cannot be tested: {e}', pytrace=False)


def _names_in(caption: str) -> set[int]:
    """Labels whose class name occurs in ``caption`` ('shirt' also matches inside 't-shirt': ignore that)."""
    found = {i for i, name in enumerate(CLASSNAMES) if name in caption}
    if 0 in found:
        found.discard(6)
    return found


def test_load_splits():
    images, labels = load_fashion_mnist('train')
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert sorted(Counter(labels.tolist()).values()) == [6000] * 10
    test_images, test_labels = load_fashion_mnist('test')
    assert test_images.shape == (10000, 28, 28) and set(test_labels.tolist()) == set(range(10))
    assert fashion_mnist_classnames() == list(CLASSNAMES) and len(CLASSNAMES) == 10
    with pytest.raises(ValueError, match='split must be one of'):
        load_fashion_mnist('val')


def test_missing_files_name_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match='dataset-fashion-mnist'):
        FashionMNISTCaptions('train', root=tmp_path)


def test_examples_are_pure_functions_of_seed_and_index():
    a = FashionMNISTCaptions('test', num_samples=200, noise=NOISE, seed=1)
    b = FashionMNISTCaptions('test', num_samples=200, noise=NOISE, seed=1)
    c = FashionMNISTCaptions('test', num_samples=200, noise=NOISE, seed=2)
    for i in (0, 17, 199):
        ea, eb = a.example(i), b.example(i)
        assert ea['caption'] == eb['caption'] and ea['kind'] == eb['kind']
        assert np.array_equal(np.asarray(ea['image']), np.asarray(eb['image']))
    assert [a.example(i)['caption'] for i in range(50)] != [c.example(i)['caption'] for i in range(50)]
    assert a.example(0)['image'].size == (28, 28)
    with pytest.raises(IndexError):
        a.example(200)


def test_noise_kinds_and_their_captions():
    ds = FashionMNISTCaptions('train', num_samples=4000, noise=NOISE, seed=0)
    examples = [ds.example(i) for i in range(len(ds))]
    kinds = Counter(e['kind'] for e in examples)
    for kind, fraction in (('mismatched', 0.2), ('junk', 0.1), ('near_duplicate', 0.1), ('clean', 0.6)):
        assert abs(kinds[kind] / len(ds) - fraction) < 0.03, (kind, kinds)
    images = ds.images
    for e in examples[:800]:
        names = _names_in(e['caption'])
        if e['kind'] == 'clean':
            assert e['clean'] and names == {e['label']} and e['source'] == e['index'], e
        elif e['kind'] == 'mismatched':
            assert not e['clean'] and e['label'] not in names and len(names) == 1, e
        elif e['kind'] == 'junk':
            assert not e['clean'] and not names, e
        else:  # a perturbed copy of a popular image, captioned correctly
            assert e['clean'] and e['source'] < 20 and names == {e['label']}
            diff = np.abs(np.asarray(e['image'], np.float32) - images[e['source']].astype(np.float32)).mean()
            assert 0 < diff < 60, 'near, not exact, duplicate'


def test_curated_subset_is_clean_and_balanced():
    ds = FashionMNISTCaptions.curated(200, seed=3)
    assert len(ds) == 200
    examples = [ds.example(i) for i in range(len(ds))]
    assert all(e['kind'] == 'clean' and e['clean'] for e in examples)
    assert sorted(Counter(e['label'] for e in examples).values()) == [20] * 10
    assert len({e['source'] for e in examples}) == 200
    assert not np.array_equal(ds.indices, FashionMNISTCaptions.curated(200, seed=4).indices)


def test_web_noise_validation():
    with pytest.raises(ValueError, match='sum to at most 1'):
        WebNoise(mismatched=0.6, junk=0.5)
    with pytest.raises(ValueError, match=r'WebNoise\.junk must be a fraction'):
        WebNoise(junk=-0.1)


def test_convert_and_stream(tmp_path, streaming_shm):  # noqa: F811
    out = str(tmp_path / 'fmnist')
    summary = convert_fashion_mnist(out, split='test', num_samples=48, noise=NOISE, seed=5,
                                    options=MDSOptions(size_limit=8_000, progress=False))
    assert summary.written == 48
    from composer_jest.models.clip import CLIPModel

    tokenizer = CLIPModel('jest-tiny').tokenizer
    loader = build_streaming_dataloader(None, out, tokenizer, batch_size=8, shuffle=False)
    batches = list(loader)
    assert len(batches) == 6 and batches[0]['image'].shape == (8, 3, 32, 32)
    ds = FashionMNISTCaptions('test', num_samples=48, noise=NOISE, seed=5)
    for batch in batches:
        for index, label, clean in zip(batch['index'].tolist(), batch['label'].tolist(), batch['clean'].tolist()):
            ex = ds.example(index)
            assert (label, bool(clean)) == (ex['label'], ex['clean'])
    curated = convert_fashion_mnist(str(tmp_path / 'curated'), curated=30,
                                    options=MDSOptions(size_limit=8_000, progress=False))
    assert curated.written == 30
    del loader
