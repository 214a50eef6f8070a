"""Pretrained weights through open_clip's own loading (`pretrained:`), for the learner and the reference, offline."""

from __future__ import annotations

import argparse
import json

import huggingface_hub.constants
import open_clip
import pytest
import torch
from s3_server import streaming_shm  # noqa: F401  (pytest fixture)
from safetensors.torch import save_file
from streaming import StreamingDataset

from composer_jest import JEST, CLIPModel
from composer_jest.data.convert import MDSOptions, convert_shapes
from composer_jest.jest.embed_reference import main as embed_main
from composer_jest.jest.reference import load_reference
from composer_jest.models.checkpoint import CheckpointError
from composer_jest.models.clip import eval_image_transform
from composer_jest.run.builders import build_model, dry_run
from composer_jest.run.config import load_config


@pytest.fixture
def weights(tmp_path):
    """A tiny open_clip model's state_dict as open_clip itself saves it (a scalar logit_scale), and the model."""
    torch.manual_seed(3)
    clip = open_clip.create_model('jest-tiny')
    with torch.no_grad():
        clip.logit_scale.fill_(2.5)
    path = tmp_path / 'open_clip_pytorch_model.bin'
    torch.save(clip.state_dict(), path)
    return str(path), clip.state_dict()


def _assert_loaded(module: torch.nn.Module, expected: dict) -> None:
    got = module.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key].reshape(value.shape), value), key
    assert got['logit_scale'].shape == (1,), 'this package keeps a 1-element logit_scale (FSDP2)'


def test_the_learner_starts_from_a_local_weights_file(weights):
    path, expected = weights
    torch.manual_seed(0)
    _assert_loaded(CLIPModel('jest-tiny', pretrained=path).towers.clip, expected)
    safetensors = path.replace('.bin', '.safetensors')  # Hugging Face's format: arrays only, read as it is
    save_file({k: v.contiguous() for k, v in expected.items()}, safetensors)
    _assert_loaded(CLIPModel('jest-tiny', pretrained=safetensors).towers.clip, expected)
    cfg = load_config('yamls/quickstart.yaml', [f'model.pretrained={path}'])
    _assert_loaded(build_model(cfg.model).towers.clip, expected)
    with pytest.raises(ValueError, match='give checkpoint .* or pretrained .*, not both'):
        both = [f'model.pretrained={path}', f'model.checkpoint={path}']
        build_model(load_config('yamls/quickstart.yaml', both).model)


def test_the_reference_loads_pretrained_weights_at_construction(weights):
    path, expected = weights
    jest = JEST(reference={'model': 'jest-tiny', 'pretrained': path}, filter_ratio=0.5, n_chunks=2)
    _assert_loaded(jest.reference.clip, expected)
    assert not any(p.requires_grad for p in jest.reference.parameters())
    cfg = load_config('yamls/quickstart.yaml', [f'algorithms.jest.reference={{model: jest-tiny, pretrained: {path}}}'])
    _assert_loaded(dry_run(cfg, world_size=1)['algorithms'][0].reference.clip, expected)
    with pytest.raises(ValueError, match="give 'checkpoint' .* or 'pretrained' .*, not both"):
        load_reference({'model': 'jest-tiny', 'pretrained': path, 'checkpoint': path})
    with pytest.raises(ValueError, match="reference dict takes keys 'model' .* 'pretrained', got .*'pretrain'"):
        load_reference({'model': 'jest-tiny', 'pretrain': path})


def test_bad_pretrained_values_fail_naming_the_field_and_what_works(weights, tmp_path):
    path, expected = weights
    with pytest.raises(ValueError, match=r"reference.pretrained='laion2b' is neither a local weights file nor an "
                                         r"open_clip tag of 'jest-tiny' \(its tags: \[\]\)"):
        JEST(reference={'model': 'jest-tiny', 'pretrained': 'laion2b'}, filter_ratio=0.5)
    with pytest.raises(ValueError, match=r"model.pretrained='.*' needs an open_clip model name"):
        CLIPModel({'embed_dim': 8}, pretrained=path)
    # a state_dict of another architecture: open_clip's strict load, named
    bad = {k: (v[:, :4] if k == 'text_projection' else v) for k, v in expected.items()}
    torch.save(bad, tmp_path / 'other.pt')
    with pytest.raises(ValueError, match=r"model.pretrained='.*other.pt' does not fit the architecture 'jest-tiny': "
                                         r'.*text_projection'):
        CLIPModel('jest-tiny', pretrained=str(tmp_path / 'other.pt'))
    # a file holding Python objects is refused (weights_only with the checkpoint module's allowlist), named
    torch.save({**expected, 'args': argparse.Namespace(lr=1)}, tmp_path / 'pickled.pt')
    with pytest.raises(CheckpointError, match=r'pickled.pt: refused to load: .*argparse.Namespace'):
        CLIPModel('jest-tiny', pretrained=str(tmp_path / 'pickled.pt'))
    (tmp_path / 'page.bin').write_text('<html>404</html>')  # a failed download saved as the weights file
    (tmp_path / 'page.safetensors').write_text('<html>404</html>')
    with pytest.raises(CheckpointError, match='page.safetensors: unreadable weights file'):
        CLIPModel('jest-tiny', pretrained=str(tmp_path / 'page.safetensors'))
    with pytest.raises(CheckpointError, match='page.bin: not a PyTorch checkpoint'):
        CLIPModel('jest-tiny', pretrained=str(tmp_path / 'page.bin'))


def test_an_open_clip_tag_offline_fails_naming_the_tag_and_the_local_file_alternative(monkeypatch):
    # offline the hub client fails at once (else after ~45 s of retries); the tag is a real open_clip one
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    assert 'laion400m_e31' in open_clip.list_pretrained_tags_by_model('ViT-B-32')
    with pytest.raises(ValueError, match=r"reference.pretrained='laion400m_e31': could not download open_clip's "
                                         r"pretrained weights 'laion400m_e31' of 'ViT-B-32' \(offline\?\).*"
                                         r'pass a local weights file instead'):
        load_reference({'model': 'ViT-B-32', 'pretrained': 'laion400m_e31'})


def test_embed_reference_with_pretrained_weights_embeds_with_them(weights, tmp_path, streaming_shm, capsys):  # noqa: F811
    path, expected = weights
    convert_shapes(str(tmp_path / 'shapes'), num_samples=8, seed=1, options=MDSOptions(progress=False))
    argv = ['--model', 'jest-tiny', '--pretrained', path, '--local', str(tmp_path / 'shapes'), '--out',
            str(tmp_path / 'embedded'), '--batch-size', '8', '--no-progress', '--device', 'cpu']
    assert embed_main(argv) == 0
    meta = json.loads((tmp_path / 'embedded' / 'reference.json').read_text())
    assert (meta['pretrained'], meta['checkpoint']) == (path, None)
    clip = open_clip.create_model('jest-tiny')
    clip.load_state_dict(expected)
    assert meta['logit_scale'] == pytest.approx(clip.logit_scale.exp().item())
    sample = StreamingDataset(local=str(tmp_path / 'embedded'), shuffle=False, batch_size=1)[0]
    image = eval_image_transform(clip)(sample['image'])  # shapes are stored as PNG: a PIL image
    with torch.no_grad():
        want = torch.nn.functional.normalize(clip.encode_image(image[None]), dim=-1)[0]
    assert torch.allclose(torch.tensor(sample['ref_image_features']).float(), want, atol=2e-3)


def test_a_composer_checkpoint_given_as_pretrained_points_to_checkpoint(tmp_path):
    from composer import Trainer

    model = CLIPModel('jest-tiny')
    Trainer(model=model, optimizers=torch.optim.SGD(model.parameters(), lr=0.1), max_duration='1ba',
            progress_bar=False).save_checkpoint(str(tmp_path / 'run.pt'))
    with pytest.raises(ValueError, match=r"does not fit .*goes in `checkpoint`, not `pretrained`"):
        CLIPModel('jest-tiny', pretrained=str(tmp_path / 'run.pt'))
    assert load_reference({'model': 'jest-tiny', 'checkpoint': str(tmp_path / 'run.pt')}) is not None
