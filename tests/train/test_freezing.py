"""`keye.train.freezing`: which parameters train in a stage, and the pooling head only where it is used."""

from __future__ import annotations

import torch

from keye.train.freezing import apply_freezing


class _Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)  # a pooling head: used only by a model that pools


class _Composed(torch.nn.Module):
    """A stage-1+ model: the encoder's head is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.vision_encoder = _Encoder()
        self.projector = torch.nn.Linear(4, 8)


class _Pooling(_Composed):
    uses_vision_head = True


def test_head_frozen_where_the_model_does_not_pool() -> None:
    model = _Composed()
    counts = apply_freezing(model, ["vision_encoder"])
    assert all(p.requires_grad for p in model.vision_encoder.layer.parameters())
    assert not any(p.requires_grad for p in model.vision_encoder.head.parameters())
    assert not any(p.requires_grad for p in model.projector.parameters())
    assert counts == {"vision_encoder": 20, "projector": 0}


def test_head_trains_where_the_model_pools() -> None:
    model = _Pooling()
    counts = apply_freezing(model, ["vision_encoder", "projector"])
    assert all(p.requires_grad for p in model.parameters())
    assert counts == {"vision_encoder": 30, "projector": 40}


def test_contrastive_stage_model_pools() -> None:
    from keye_plugins.stage.contrastive import ContrastiveModel

    assert ContrastiveModel.uses_vision_head is True
