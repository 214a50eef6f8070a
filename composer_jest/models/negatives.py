"""A negatives queue (MoCo, He et al. 2020) for the anchor (softmax-family) objectives.

A momentum copy of the learner's towers embeds every trained batch after its loss; the last ``queue_size``
embeddings are extra negatives of every anchor in the next steps (queued texts for image anchors, queued images
for text anchors). The copy, the queue, its fill flags and write position are parameters/buffers of the model, so a
Composer checkpoint holds them and a resumed run continues exactly.

Composer's ``EMA`` algorithm keeps an average of the weights to swap in for evaluation, not a second encoder that
runs during training, so the copy is updated here (the same ``θ_m ← m θ_m + (1 - m) θ``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from composer.utils import dist
from torch import nn

from composer_jest.core.objectives import QUEUE_KEYS, Negatives

__all__ = ['NegativesQueue']


def _embed_dim(towers: nn.Module) -> int:
    clip = towers.clip
    dim = getattr(getattr(clip, 'visual', None), 'output_dim', None)
    if dim is None:
        projection = getattr(clip, 'text_projection', None)
        if isinstance(projection, torch.Tensor):
            dim = projection.shape[-1]
        else:
            dim = getattr(projection, 'out_features', None)
    if dim is None:
        raise ValueError('negatives: cannot infer the embedding size of these towers (no visual.output_dim)')
    return int(dim)


class NegativesQueue(nn.Module):
    """The momentum towers and the ring buffer of their embeddings.

    Example:
        >>> from composer_jest import CLIPModel
        >>> model = CLIPModel('jest-tiny', loss={'name': 'softmax', 'negatives': {'queue_size': 8}})
        >>> model.negatives.queue_image.shape, int(model.negatives.valid.sum())
        (torch.Size([8, 64]), 0)
    """

    def __init__(self, towers: nn.Module, settings: Negatives):
        super().__init__()
        self.momentum = settings.momentum
        self.towers = copy.deepcopy(towers).requires_grad_(False).eval()
        k, dim = settings.queue_size, _embed_dim(towers)
        self.register_buffer('queue_image', torch.zeros(k, dim))
        self.register_buffer('queue_text', torch.zeros(k, dim))
        self.register_buffer('valid', torch.zeros(k, dtype=torch.bool))
        self.register_buffer('position', torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> NegativesQueue:
        super().train(mode)
        self.towers.eval()  # the momentum encoder never runs dropout
        return self

    def features(self) -> dict[str, Any]:
        """The queue as feature keys (``QUEUE_KEYS``); copies, so a later update cannot change a saved graph."""
        return dict(zip(QUEUE_KEYS, (self.queue_image.clone(), self.queue_text.clone(), self.valid.clone())))

    @torch.no_grad()
    def update(self, learner: nn.Module, image: torch.Tensor, text: torch.Tensor) -> None:
        """Move the copy towards ``learner`` (the first time: copy it), embed the batch with it, and enqueue every
        rank's embeddings."""
        # the first update copies the learner (whose weights may have been loaded after construction)
        weight = torch.where(self.valid.any(), 1.0 - self.momentum, 1.0)  # a device scalar: no sync
        for p_m, p in zip(self.towers.parameters(), learner.parameters()):
            p_m.lerp_(p.detach().to(p_m.dtype), weight.to(p_m.device, p_m.dtype))
        out = self.towers(image, text)
        image_f, text_f = out['image_features'].float(), out['text_features'].float()
        if dist.get_world_size() > 1:
            image_f, text_f = (torch.cat(dist.all_gather(t.contiguous())) for t in (image_f, text_f))
        k, n = self.valid.numel(), image_f.shape[0]
        if n > k:
            raise ValueError(f'negatives.queue_size={k} is smaller than the global trained batch ({n}); use >= {n}')
        slots = (self.position + torch.arange(n, device=self.position.device)) % k  # on the device: no sync
        self.queue_image.index_copy_(0, slots, image_f.to(self.queue_image.device))
        self.queue_text.index_copy_(0, slots, text_f.to(self.queue_text.device))
        self.valid.index_fill_(0, slots, True)
        self.position.copy_((self.position + n) % k)
