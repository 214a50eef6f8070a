"""Behaviour the mutation run of ``objectives.py``, ``scoring.py``, ``blockwise.py`` and ``negatives.py`` found
unchecked (``tests/MUTATION.md``): spec round trips, argument checks, the false-negative signature from batch
columns, the selection cost model. Each test is exact against values written out by hand or a plain loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from composer_jest.core.negatives import FalseNegatives, Negatives
from composer_jest.core.objectives import build_objective
from composer_jest.core.scoring import STAT_BLOCK, selection_flops

# -- loss specs: every parameter under its own name, nothing added ---------------------------------------------------


@pytest.mark.parametrize('spec, canonical', [
    ('softmax', 'softmax'),
    ('dcl', 'dcl'),  # no temperature: no 'temperature': None entry, a plain name
    ({'name': 'softmax'}, 'softmax'),
    ({'name': 'npair', 'temperature': 0.5}, {'name': 'npair', 'temperature': 0.5}),
    ({'name': 'hcl', 'beta': 0.5}, {'name': 'hcl', 'beta': 0.5, 'tau_plus': 0.1}),
    ({'name': 'hcl', 'tau_plus': 0.2, 'temperature': 0.1},
     {'name': 'hcl', 'beta': 1.0, 'tau_plus': 0.2, 'temperature': 0.1}),
    ('triplet', {'name': 'triplet', 'margin': 0.2, 'mining': 'hardest'}),
    ({'name': 'triplet', 'margin': 0.5, 'mining': 'semi-hard'},
     {'name': 'triplet', 'margin': 0.5, 'mining': 'semi-hard'}),
    ({'name': 'dcl', 'false_negatives': {'threshold': 0.8, 'modality': 'either'}},
     {'name': 'dcl', 'false_negatives': {'threshold': 0.8, 'modality': 'either'}}),
    ({'name': 'sigmoid', 'false_negatives': {'key': 'label'}},
     {'name': 'sigmoid', 'false_negatives': {'key': 'label', 'modality': 'image'}}),
    ({'name': 'npair', 'negatives': {'queue_size': 8}},
     {'name': 'npair', 'negatives': {'queue_size': 8, 'momentum': 0.999}}),
    ({'name': 'hcl', 'beta': 0.0, 'negatives': {'queue_size': 3, 'momentum': 0.5},
      'false_negatives': {'threshold': -0.5, 'modality': 'text'}},
     {'name': 'hcl', 'beta': 0.0, 'tau_plus': 0.1, 'false_negatives': {'threshold': -0.5, 'modality': 'text'},
      'negatives': {'queue_size': 3, 'momentum': 0.5}}),
], ids=str)
def test_spec_is_canonical_and_round_trips(spec, canonical):
    obj = build_objective(spec)
    assert obj.spec() == canonical
    again = build_objective(canonical)
    assert again.spec() == canonical
    assert again.false_negatives == obj.false_negatives and again.negatives == obj.negatives


# -- Negatives: queue_size an int >= 1, momentum in [0, 1) ------------------------------------------------------------


@pytest.mark.parametrize('queue_size, momentum', [(1, 0.0), (1, 0), (5, 0.999), (4096, 0.5)])
def test_negatives_accepts_its_range(queue_size, momentum):
    neg = Negatives(queue_size, momentum)
    assert (neg.queue_size, neg.momentum) == (queue_size, momentum)
    assert Negatives(7).momentum == 0.999


@pytest.mark.parametrize('queue_size, momentum', [
    (0, 0.5), (-3, 0.5), (True, 0.5), (2.0, 0.5), ('3', 0.5), (None, 0.5),
    (4, 1.0), (4, 1), (4, 1.5), (4, -0.1), (4, '0.5'), (4, None),
], ids=str)
def test_negatives_rejects_out_of_range(queue_size, momentum):
    with pytest.raises(ValueError, match=r'negatives\.(queue_size|momentum) must be'):
        Negatives(queue_size, momentum)


# -- FalseNegatives.signature: id columns and the reference's cached embedding columns -------------------------------


def test_key_signature_is_the_flattened_id_column():
    fn = FalseNegatives(key='label')
    sig = fn.signature({'label': [[3, 1], [3, 2]], 'other': torch.zeros(4)})
    assert sig.tolist() == [3, 1, 3, 2]
    assert fn.mask(sig).int().tolist() == [[0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert fn.signature({'label': torch.tensor([5])}).tolist() == [5]
    with pytest.raises(KeyError, match="'label' is not a batch key"):
        fn.signature({'dup_id': torch.zeros(3)})


@pytest.mark.parametrize('modality', ['image', 'text', 'either'])
def test_threshold_signature_from_the_batch_columns(modality):
    g = torch.Generator().manual_seed(0)
    n, d = 7, 5
    image = torch.randn(n, d, generator=g) * 3  # unnormalised: the signature normalises each row
    text = torch.randn(n, d, generator=g).double()
    batch = {'ref_image_features': image, 'ref_text_features': text}
    fn = FalseNegatives(threshold=0.1, modality=modality)
    sig = fn.signature(batch)
    parts = {'image': [image], 'text': [text], 'either': [image, text]}[modality]
    expected = torch.cat([p.float() / p.float().norm(dim=1, keepdim=True) for p in parts], 1)
    assert sig.dtype == torch.float32
    torch.testing.assert_close(sig, expected)
    assert torch.equal(sig, fn.signature({}, {'image_features': image, 'text_features': text}))
    # the mask against a loop over pairs: above the threshold in the modality (either: in one of the two)
    cos = [[[float(F.cosine_similarity(p[i].double(), p[j].double(), dim=0)) for j in range(n)] for i in range(n)]
           for p in parts]
    want = [[i != j and any(c[i][j] > 0.1 for c in cos) for j in range(n)] for i in range(n)]
    assert fn.mask(sig).tolist() == want
    assert 0 < sum(map(sum, want)) < n * (n - 1)  # some pairs marked, not all


# -- selection_flops: the cost model written out chunk by chunk ------------------------------------------------------


def _flops_by_loop(loss: str, n: int, b: int, dim: int, n_chunks: int = 16, world_size: int = 1,
                   models: int = 2) -> int:
    """One rank's matmul FLOPs, counted per chunk (2 per multiply-add)."""
    k = min(n_chunks, b)
    sizes = [b // k + (1 if i < b % k else 0) for i in range(k)]
    per_model, chosen = 0, 0
    for t, c in enumerate(sizes):
        if loss == 'softmax' and t > 0:
            per_model += 2 * (2 * n * chosen * dim)  # l_ik and l_ki of every local row against the chosen set
        per_model += 2 * (2 * n * (c * world_size) * dim)  # l_kj and l_jk against the gathered chunk
        chosen += c * world_size
    if loss == 'softmax':
        per_model += 2 * n * b * dim  # the b-block statistic: an n x b product
    else:
        per_model += 2 * n * min(STAT_BLOCK, n) * dim  # pairs inside STAT_BLOCK-row blocks
    return models * per_model


@pytest.mark.parametrize('loss, n, b, dim, kw', [
    ('softmax', 10, 5, 3, {'n_chunks': 3, 'world_size': 2, 'models': 1}),
    ('softmax', 40, 20, 4, {}),  # defaults: 16 chunks, one rank, two models
    ('softmax', 12, 3, 2, {'n_chunks': 8}),  # more chunks than picks
    ('sigmoid', 10, 4, 3, {'world_size': 3}),
    ('sigmoid', 300, 50, 6, {'models': 1}),  # n > STAT_BLOCK
    ('sigmoid', 2560, 512, 768, {'world_size': 64}),
])
def test_selection_flops_counts_every_chunk(loss, n, b, dim, kw):
    got = selection_flops(loss, n, b, dim, **kw)
    assert isinstance(got, float)
    assert got == float(_flops_by_loop(loss, n, b, dim, **kw))


def test_selection_flops_by_hand():
    # softmax, n=10, b=5 in chunks [2, 2, 1], 2 ranks: 4·10·10·3 + 4·10·(4 + 8)·3 + 2·10·5·3
    assert selection_flops('softmax', 10, 5, 3, n_chunks=3, world_size=2, models=1) == 1200 + 1440 + 300
    # sigmoid, n=300: 2 models x (4·300·50·6 + 2·300·256·6)
    assert selection_flops('sigmoid', 300, 50, 6) == 2 * (360000 + 921600)
