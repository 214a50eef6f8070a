"""Issue 13's speed paths: length-bucketed text encoding, the fast scoring forward, the fused DecoupledAdamW."""

from __future__ import annotations

import itertools
import random

import open_clip
import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.loggers import InMemoryLogger
from composer.optim import DecoupledAdamW
from model_helpers import captions
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from composer_jest import JEST, CLIPModel
from composer_jest.models.flops import (
    bucketed_text_flops,
    logits_flops,
    step_flops,
    text_forward_flops,
    vit_forward_flops,
)
from composer_jest.models.text_buckets import bucket_plan, caption_lengths, encoded_positions, length_histogram
from composer_jest.run.optim import FusedDecoupledAdamW


def brute_force_plan_cost(counts: list[int], k: int, overhead: float = 0) -> float:
    lengths = [length for length, c in enumerate(counts) if c]
    best = None
    for cuts in range(k):  # every way to cut the distinct lengths into cuts + 1 contiguous groups
        for ends in itertools.combinations(range(len(lengths) - 1), cuts):
            bounds, start, cost = list(ends) + [len(lengths) - 1], 0, 0
            for end in bounds:
                cost += sum(counts[length] for length in lengths[start:end + 1]) * lengths[end]
                start = end + 1
            cost += cuts * overhead
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize('seed', range(6))
def test_bucket_plan_is_the_least_positions_cut(seed):
    rng = random.Random(seed)
    counts = [0] + [rng.choice([0, 0, 1, 3, 7]) for _ in range(12)]
    counts[rng.randrange(1, 13)] += 1
    for k, overhead in itertools.product((1, 2, 3, 5), (0, 7, 30)):
        plan = bucket_plan(counts, k, overhead)
        assert len(plan) <= k and sum(n for _, n in plan) == sum(counts)
        assert [length for length, _ in plan] == sorted({length for length, _ in plan})
        cost = encoded_positions(plan) + (len(plan) - 1) * overhead
        assert cost == brute_force_plan_cost(counts, k, overhead)
    assert encoded_positions(bucket_plan(counts, 99)) == sum(c * length for length, c in enumerate(counts))
    assert len(bucket_plan(counts, 5, overhead=10**9)) == 1  # a call costs more than any saving
    with pytest.raises(ValueError, match='text_buckets'):
        bucket_plan(counts, 0)
    with pytest.raises(ValueError, match='text_bucket_overhead'):
        bucket_plan(counts, 2, overhead=-1)


def test_bucketed_text_equals_untrimmed_forward_and_backward_and_costs_its_own_lengths():
    torch.manual_seed(0)
    model = CLIPModel('jest-tiny')
    model.towers.double()  # float64: bucketing changes summation order only, so the match is tight
    clip, towers = model.towers.clip, model.towers
    towers.text_bucket_overhead = 0  # 12 captions: split them whenever it saves a position
    text = captions(12, clip.context_length, clip.vocab_size, seed=1,
                    lengths=[3, 3, 4, 4, 4, 5, 6, 6, 16, 3, 9, 10])
    assert towers.text_buckets > 1
    plan = bucket_plan(length_histogram(caption_lengths(text), clip.context_length), towers.text_buckets, 0)
    assert len(plan) > 1  # the captions really are split
    full = clip.encode_text(text)
    bucketed = towers.encode_text(text)
    torch.testing.assert_close(bucketed, full, atol=1e-12, rtol=1e-12)  # same features, in the input order
    assert towers.encode_text(text[:0]).shape == (0, full.shape[1])  # an empty batch: no plan, no error
    grad_b = torch.autograd.grad(bucketed.square().sum(), clip.token_embedding.weight)[0]
    grad_f = torch.autograd.grad(clip.encode_text(text).square().sum(), clip.token_embedding.weight)[0]
    torch.testing.assert_close(grad_b, grad_f, atol=1e-12, rtol=1e-10)

    # The cost: a FLOP counter sees what the analytic bucketed count says, well below one trim to the max (16).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        towers.encode_text(text)
    counts = length_histogram(caption_lengths(text), clip.context_length)
    analytic = bucketed_text_flops(clip, counts, towers.text_buckets, towers.text_bucket_overhead)
    assert counter.get_total_flops() == pytest.approx(analytic, rel=1e-6)
    assert analytic < 0.6 * text.shape[0] * text_forward_flops(clip, 16)


def test_forward_plans_text_buckets_before_queueing_the_image_tower(monkeypatch):
    """The plan's host copy (a CUDA sync) comes first, so the text dispatch can overlap the image tower's GPU time."""
    import composer_jest.models.clip as model_module

    torch.manual_seed(0)
    towers = CLIPModel('jest-tiny').towers.eval()
    clip = towers.clip
    events = []
    histogram = model_module.length_histogram
    monkeypatch.setattr(model_module, 'length_histogram', lambda *a, **k: events.append('plan') or histogram(*a, **k))
    clip.visual.transformer.register_forward_pre_hook(lambda *_: events.append('image'))
    text = captions(6, clip.context_length, clip.vocab_size, seed=2, lengths=[3, 9, 4, 16, 5, 3])
    image = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        out = towers(image, text)
        assert events == ['plan', 'image']  # one plan, taken before the image tower ran
        torch.testing.assert_close(out['text_features'], F.normalize(clip.encode_text(text), dim=-1),
                                   atol=1e-5, rtol=1e-5)
        events.clear()
        towers(image, text, low_res=3, low_res_patch_size=16)  # multi-resolution: one packed image call, after it
        assert events == ['plan', 'image']
        events.clear()
        towers.pack = False
        towers(image, text, low_res=3, low_res_patch_size=16)  # unpacked: one image call per resolution
        assert events == ['plan', 'image', 'image']


def test_step_flops_cost_captions_by_bucket():
    cfg = open_clip.get_model_config('jest-vit-b-16')
    with torch.device('meta'):
        clip = open_clip.CLIP(**cfg, nonscalar_logit_scale=True)
    lengths = [8] * 600 + [14] * 500 + [40] * 180  # N = 1280 alt-text-like captions, a long tail
    counts = length_histogram(lengths, 64)
    kw = dict(superbatch=1280, subbatch=256, learner_patch_size=32, reference_cached=True)
    f = step_flops(clip, text_length_counts=counts, text_buckets=4, **kw)
    per_caption = (600 * text_forward_flops(clip, 8) + 500 * text_forward_flops(clip, 14)
                   + 180 * text_forward_flops(clip, 40)) / 1280
    trimmed = step_flops(clip, text_tokens=40, **kw)  # the old cost: every caption at the longest one
    assert f['learner_scoring'] - trimmed['learner_scoring'] == pytest.approx(
        1280 * (per_caption - text_forward_flops(clip, 40)), rel=1e-9)
    assert f['ratio'] < trimmed['ratio']
    one_bucket = step_flops(clip, text_length_counts=counts, text_buckets=1, **kw)
    assert one_bucket['ratio'] == pytest.approx(trimmed['ratio'], rel=1e-12)
    with pytest.raises(ValueError, match='not both'):
        step_flops(clip, text_tokens=40, text_length_counts=counts, **kw)

    def train_text_per_caption(b: int) -> float:  # uniform_train = 3 (b (image + text) + logits)
        u = step_flops(clip, superbatch=1280, subbatch=b, text_length_counts=counts)['uniform_train']
        return (u / 3 - logits_flops(b, 768) - b * vit_forward_flops(clip.visual)) / b

    # The trained batch is costed as b captions of the super-batch's length distribution, with its own plan:
    # b = 256 is the histogram / 5 exactly (120, 100, 36); b = 255 gives fractional expected counts.
    assert train_text_per_caption(256) == pytest.approx(
        bucketed_text_flops(clip, length_histogram([8] * 120 + [14] * 100 + [40] * 36, 64)) / 256, rel=1e-9)
    assert train_text_per_caption(255) == pytest.approx(train_text_per_caption(256), rel=1e-3)


def _run_scoring(fast: bool, batch: dict, reference: CLIPModel) -> dict:
    """One JEST step under ``amp_bf16``; what the learner's scoring call and the reference returned.

    Composer refuses ``amp_bf16`` on a CPU device and its precision context is a no-op there, so the state's
    precision is set after construction: the learner then scores in float32 either way, and the frozen reference
    shows the bf16 end-to-end path (the part of the fast forward that changes numbers).
    """
    torch.manual_seed(0)
    learner = CLIPModel('jest-tiny')
    seen: dict = {}

    def hook(name):
        def record(module, args, out):
            if name not in seen:  # the first call of the step is the scoring one (AFTER_DATALOADER)
                seen[name] = {'inference': torch.is_inference_mode_enabled(), 'training': module.training,
                              **{k: v.detach().float().clone() for k, v in out.items() if k.endswith('features')}}
        return record

    jest = JEST(reference=reference, filter_ratio=0.5, n_chunks=2, seed=0, fast_scoring=fast)
    learner.towers.register_forward_hook(hook('learner'))
    trainer = Trainer(model=learner, train_dataloader=[batch], max_duration='1ba',
                      optimizers=DecoupledAdamW(learner.parameters(), lr=1e-3), algorithms=[jest],
                      device='cpu', device_train_microbatch_size=8, progress_bar=False, log_to_console=False,
                      loggers=[])
    trainer.state.precision = 'amp_bf16'
    jest._fit_start(trainer.state)  # load the reference now so that its forward can be hooked
    jest.reference.register_forward_hook(hook('reference'))
    trainer.fit()  # the training step after an inference-mode scoring call runs (and backpropagates)
    seen['reference_dtypes'] = {n: p.dtype for n, p in jest.reference.named_parameters()}
    return seen


def _reference_and_batch() -> tuple[CLIPModel, dict]:
    """A jest-tiny reference and a 16-example batch with alt-text-like caption lengths (fixed seeds)."""
    torch.manual_seed(1)
    reference = CLIPModel('jest-tiny')
    clip = reference.towers.clip
    g = torch.Generator().manual_seed(2)
    batch = {'image': torch.randn(16, 3, 32, 32, generator=g),
             'text': captions(16, clip.context_length, clip.vocab_size, seed=3)}
    return reference, batch


def test_fast_scoring_is_inference_mode_bf16_reference_and_matches_the_plain_path():
    reference, batch = _reference_and_batch()
    plain, fast = _run_scoring(False, batch, reference), _run_scoring(True, batch, reference)
    assert not plain['learner']['inference'] and fast['learner']['inference']
    assert not fast['learner']['training']  # scored in eval mode either way
    dtypes = fast['reference_dtypes']
    assert dtypes['clip.logit_scale'] == torch.float32 and dtypes['clip.logit_bias'] == torch.float32
    assert dtypes['clip.visual.conv1.weight'] == dtypes['clip.token_embedding.weight'] == torch.bfloat16
    assert all(d == torch.float32 for d in plain['reference_dtypes'].values())
    for who in ('learner', 'reference'):
        for key in ('image_features', 'text_features'):  # unit vectors: bf16 keeps ~3 significant digits
            torch.testing.assert_close(fast[who][key], plain[who][key], atol=3e-2, rtol=0)
            cosine = F.cosine_similarity(fast[who][key], plain[who][key], dim=-1)
            assert cosine.min() > (0.99 if who == 'reference' else 1 - 1e-6), cosine  # learner: float32 both ways


def test_fused_decoupled_adamw_is_composers_update():
    def train(make_optimizer):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 2))
        opt = make_optimizer([{'params': net[0].parameters()}, {'params': net[2].parameters(), 'lr': 3e-3}])
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 3) * 0.9 ** step)
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            x = torch.randn(8, 5, generator=g)
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
            schedule.step()
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    expected = train(lambda groups: DecoupledAdamW(groups, lr=1e-2, weight_decay=1e-2))
    for fused in (False, True):
        got = train(lambda groups, fused=fused: FusedDecoupledAdamW(groups, lr=1e-2, weight_decay=1e-2, fused=fused))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    plain = train(lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), weight_decay=1e-2))
    assert not torch.allclose(plain, expected, atol=1e-6)  # the decay rescaling matters
    with pytest.raises(ValueError, match='lr must be > 0'):
        FusedDecoupledAdamW([torch.nn.Parameter(torch.ones(2))], lr=0.0)


def test_compiled_scoring_selects_what_the_eager_forward_selects():
    reference, batch = _reference_and_batch()
    picked, learnability = {}, {}
    for compiled in (False, {'backend': 'eager'}):  # dynamo tracing without inductor's C++ build (CPU test)
        torch.manual_seed(0)
        learner = CLIPModel('jest-tiny')
        jest = JEST(reference=reference, filter_ratio=0.5, n_chunks=2, seed=0, compile_scoring=compiled)
        logger = InMemoryLogger()
        trainer = Trainer(model=learner, train_dataloader=[batch, batch], max_duration='2ba',
                          optimizers=DecoupledAdamW(learner.parameters(), lr=1e-2), algorithms=[jest], device='cpu',
                          device_train_microbatch_size=8, progress_bar=False, log_to_console=False, loggers=[logger])
        trainer.fit()
        assert (jest._inputs._compiled is not None) == bool(compiled)
        picked[bool(compiled)] = jest.last_indices.tolist()
        learnability[bool(compiled)] = [float(v) for _, v in logger.data['jest/learnability_superbatch']]
    # Step 2 scores the same batch after an update: the compiled forward must see the new weights.
    assert learnability[False][0] != pytest.approx(learnability[False][1], rel=1e-4)
    assert learnability[True] == pytest.approx(learnability[False], rel=1e-5)
    assert picked[True] == picked[False]
    with pytest.raises(ValueError, match='compile_scoring'):
        JEST(reference=reference, compile_scoring='yes')
