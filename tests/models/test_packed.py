"""Packed transformer calls (composer_jest.models.packed): several groups of sequences, one call, the same numbers."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from model_helpers import captions
from torch.utils._python_dispatch import TorchDispatchMode

from composer_jest.models import packed
from composer_jest.models.clip import CLIPModel, CLIPTowers

MATMULS = ('aten.mm', 'aten.addmm')


class OpCount(TorchDispatchMode):
    """Counts every aten op dispatched inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def total(self, names=None) -> int:
        return sum(v for k, v in self.counts.items() if names is None or k in names)


def towers_pair(**kwargs) -> tuple[CLIPTowers, CLIPTowers]:
    """Two identical float64 jest-tiny towers: one packs, the other runs one transformer call per group."""
    torch.manual_seed(0)
    towers = CLIPModel('jest-tiny', **kwargs).towers.double()
    towers.text_bucket_overhead = 0  # split small test batches whenever it saves a position
    plain = copy.deepcopy(towers)
    plain.pack = False
    return towers, plain


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_same_grads(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-11, rtol=1e-9, msg=name)


LENGTHS = [3, 3, 4, 4, 4, 5, 6, 6, 16, 3, 9, 10, 12, 2]


@pytest.mark.parametrize('buckets', [1, 3, 8])
def test_packed_text_equals_per_bucket_calls_and_open_clip_forward_and_backward(buckets):
    towers, plain = towers_pair()
    clip = towers.clip
    towers.text_buckets = plain.text_buckets = buckets
    text = captions(len(LENGTHS), clip.context_length, clip.vocab_size, seed=3, lengths=LENGTHS)
    plan = towers.text_plan(text)
    assert len(plan) == min(buckets, len(set(LENGTHS)))
    out, ref = towers.encode_text(text), plain.encode_text(text)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)  # in the input order
    torch.testing.assert_close(out, plain.clip.encode_text(text), atol=1e-12, rtol=1e-12)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(4))
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    assert_same_grads(towers, plain)


def test_packed_text_runs_each_matmul_once_whatever_the_bucket_count():
    """The point of packing: the QKV / output / MLP matmuls run once per block, not once per bucket."""
    towers, plain = towers_pair()
    clip = towers.clip
    text = captions(len(LENGTHS), clip.context_length, clip.vocab_size, seed=3, lengths=LENGTHS)
    blocks = len(clip.transformer.resblocks)
    counts = {}
    for buckets in (1, 4):
        towers.text_buckets = plain.text_buckets = buckets
        assert len(towers.text_plan(text)) == buckets
        for name, t in (('packed', towers), ('plain', plain)):
            with torch.no_grad(), OpCount() as ops:
                t.encode_text(text)
            counts[name, buckets] = ops
    # 4 matmuls per block (QKV, attention output, MLP in and out) + the text projection, for any plan.
    assert counts['packed', 1].total(MATMULS) == counts['packed', 4].total(MATMULS) == 4 * blocks + 1
    assert counts['plain', 4].total(MATMULS) == 4 * 4 * blocks + 1  # per bucket: every block's 4 matmuls
    # attention stays per bucket; everything else is shared, so the dispatched ops drop sharply
    attention = [k for k in counts['packed', 4].counts if 'scaled_dot_product' in k]
    assert attention and counts['packed', 4].total(attention) == 4 * blocks
    assert counts['packed', 4].total() < 0.5 * counts['plain', 4].total()


def test_packed_multires_image_is_one_call_equal_to_two_forward_and_backward():
    towers, plain = towers_pair()
    image = torch.randn(6, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    calls = []
    towers.clip.visual.transformer.register_forward_hook(lambda _m, args, _o: calls.append(tuple(args[0].shape)))
    out = towers(image=image, low_res=2, low_res_patch_size=16)['image_features']
    ref = plain(image=image, low_res=2, low_res_patch_size=16)['image_features']
    width = towers.clip.visual.transformer.width
    assert calls == [(1, 2 * 5 + 4 * 17, width)]  # one call: 2 images at 2x2+1 tokens, 4 at 4x4+1, laid end to end
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out[2:], F.normalize(plain.clip.encode_image(image[2:]), dim=-1), atol=1e-12,
                               rtol=1e-12)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert_same_grads(towers, plain)


def test_activation_checkpointing_recomputes_with_the_packed_layout():
    """open_clip's grad checkpointing replays each block in the backward: it must see the same groups."""
    towers, plain = towers_pair()
    towers.clip.set_grad_checkpointing(True)
    clip = towers.clip
    text = captions(len(LENGTHS), clip.context_length, clip.vocab_size, seed=6, lengths=LENGTHS)
    image = torch.randn(6, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for t in (towers, plain):
        out = t(image=image, text=text, low_res=3, low_res_patch_size=16)
        (out['image_features'] @ out['text_features'].T).sum().backward()
    assert_same_grads(towers, plain)


def test_a_stale_layout_fails_loudly():
    towers, _ = towers_pair()
    transformer = towers.clip.visual.transformer
    width = transformer.width
    packed.run(transformer, towers._image_layout, [torch.randn(2, 5, width, dtype=torch.float64)], causal=False)
    with pytest.raises(RuntimeError, match='layout of 10 positions'):
        transformer(torch.randn(1, 11, width, dtype=torch.float64), attn_mask=towers._image_layout.marker)


def test_state_dict_and_plain_calls_are_unchanged():
    towers, _ = towers_pair()
    clip = towers.clip
    assert isinstance(clip.transformer.resblocks[0].attn, packed.SegmentedAttention)
    fresh = open_clip.create_model('jest-tiny').double()
    assert list(fresh.state_dict()) == list(clip.state_dict())
    fresh.load_state_dict(clip.state_dict())
    text = captions(5, clip.context_length, clip.vocab_size, seed=8)
    image = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():  # an unpacked call (open_clip's own forward) takes nn.MultiheadAttention's path
        torch.testing.assert_close(clip.encode_text(text), fresh.encode_text(text), atol=0, rtol=0)
        torch.testing.assert_close(clip.encode_image(image), fresh.encode_image(image), atol=0, rtol=0)
    copied = copy.deepcopy(towers)  # a copy (reference, momentum encoder) packs with its own layout
    assert copied.clip.transformer.resblocks[0].attn.layout is copied._text_layout is not towers._text_layout


def test_custom_blocks_fall_back_to_one_call_per_group():
    cfg = copy.deepcopy(open_clip.get_model_config('jest-tiny'))
    cfg['text_cfg']['qk_norm'] = True  # open_clip builds CustomResidualAttentionBlock: not packable
    torch.manual_seed(0)
    towers = CLIPModel(cfg).towers.double()
    towers.text_bucket_overhead = 0
    assert towers._text_layout is None and towers._image_layout is not None
    clip = towers.clip
    text = captions(len(LENGTHS), clip.context_length, clip.vocab_size, seed=9, lengths=LENGTHS)
    assert len(towers.text_plan(text)) > 1
    torch.testing.assert_close(towers.encode_text(text), clip.encode_text(text), atol=1e-12, rtol=1e-12)


def test_packed_under_bf16_autocast_matches_per_group_calls():
    torch.manual_seed(0)
    towers = CLIPModel('jest-tiny').towers
    towers.text_bucket_overhead = 0
    plain = copy.deepcopy(towers)
    plain.pack = False
    clip = towers.clip
    text = captions(len(LENGTHS), clip.context_length, clip.vocab_size, seed=10, lengths=LENGTHS)
    image = torch.randn(6, 3, 32, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        a = towers(image=image, text=text, low_res=3, low_res_patch_size=16)
        b = plain(image=image, text=text, low_res=3, low_res_patch_size=16)
    for key in ('image_features', 'text_features'):
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=3e-2, rtol=0)


def test_two_wrappers_of_one_model_share_its_layout():
    """Both wrappers pack through the same blocks: each call must run its own groups (same total, other groups)."""
    towers, plain = towers_pair()
    other = CLIPTowers(towers.clip)
    other.text_bucket_overhead = 0
    assert other._text_layout is towers._text_layout
    clip = towers.clip
    a = captions(5, clip.context_length, clip.vocab_size, seed=11, lengths=[4, 4, 4, 4, 16])  # 32 positions
    b = captions(3, clip.context_length, clip.vocab_size, seed=12, lengths=[8, 8, 16])  # 32 positions too
    with torch.no_grad():
        other.encode_text(b)
        torch.testing.assert_close(towers.encode_text(a), plain.clip.encode_text(a), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(other.encode_text(b), plain.clip.encode_text(b), atol=1e-12, rtol=1e-12)


def test_an_attention_subclass_is_left_alone():
    class Scaled(torch.nn.MultiheadAttention):  # a user's attention with its own forward
        def forward(self, *args, **kwargs):
            out, weights = super().forward(*args, **kwargs)
            return 0.5 * out, weights

    torch.manual_seed(0)
    clip = CLIPModel('jest-tiny').towers.clip
    clip.transformer.resblocks[0].attn.__class__ = Scaled
    towers = CLIPTowers(clip)
    assert towers._text_layout is None and type(clip.transformer.resblocks[0].attn) is Scaled
