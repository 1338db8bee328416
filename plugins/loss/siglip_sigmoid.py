"""``siglip_sigmoid``: the SigLIP pairwise sigmoid loss, across data-parallel ranks.

    L = -1/|B| Σ_i Σ_j log σ(z_ij · (t · x_i·y_j + b)),   z_ii = +1, z_ij = -1 (i ≠ j),   t = exp(t')

with a learnable temperature ``t'`` (initialised at log 10) and bias ``b`` (initialised at -10), as in
the SigLIP paper and Keye-VL's stage 0. The loss is a module: its two parameters train with the model.

Across data-parallel ranks no rank ever holds the global B×B logit matrix, nor all text embeddings:
each rank scores its own images against its own texts, then passes its text block to the next rank
around a ring (``world - 1`` hops), scoring against each block it receives (all negatives). The hop is
an autograd function whose backward sends the gradient the other way round, so every text embedding
gets the gradient of every rank's images. Each rank returns its partial *sum*; dividing by the global
batch size (Megatron's per-token-loss convention) gives the exact single-process loss and gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from keye import hookimpl
from keye.config import doc


def _exchange(tensor: torch.Tensor, send_to: int, receive_from: int, group) -> torch.Tensor:
    received = torch.empty_like(tensor)
    ops = [dist.isend(tensor.contiguous(), send_to, group=group), dist.irecv(received, receive_from, group=group)]
    for op in ops:
        op.wait()
    return received


class _RingShift(torch.autograd.Function):
    """Forward: send to the next rank, receive from the previous. Backward: the reverse."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        group = group or dist.group.WORLD
        ctx.group = group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        nxt, prev = dist.get_global_rank(group, (rank + 1) % world), dist.get_global_rank(group, (rank - 1) % world)
        ctx.peers = (nxt, prev)
        return _exchange(tensor, nxt, prev, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        nxt, prev = ctx.peers
        return _exchange(grad, prev, nxt, ctx.group), None


def _pair_loss_sum(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, positive: bool) -> torch.Tensor:
    """Σ over one block of pairs; the diagonal is positive only for a rank's own block."""
    logits = scale * images @ texts.t() + bias  # (Bi, Bt)
    labels = -torch.ones_like(logits)
    if positive:
        labels += 2 * torch.eye(logits.shape[0], logits.shape[1], dtype=logits.dtype)
    return -F.logsigmoid(labels * logits).sum()


class SiglipSigmoidLoss(torch.nn.Module):
    @dataclass
    class Config:
        init_temperature: float = doc("Initial t' (t = exp(t')); SigLIP uses log 10.", math.log(10.0))
        init_bias: float = doc("Initial bias b; SigLIP uses -10.", -10.0)
        normalize: bool = doc("L2-normalise both embeddings before the dot product.", True)

    def __init__(self, config: Config, ctx=None) -> None:
        super().__init__()
        self.config = config
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(config.init_temperature)))  # t'
        self.logit_bias = torch.nn.Parameter(torch.tensor(float(config.init_bias)))  # b

    def forward(self, images: torch.Tensor, texts: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) image and text embeddings of this rank → (partial loss sum, local batch size)."""
        if self.config.normalize:
            images, texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
        scale = self.logit_scale.exp()
        total = _pair_loss_sum(images, texts, scale, self.logit_bias, positive=True)
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        for _ in range(world - 1):
            texts = _RingShift.apply(texts, group)
            total = total + _pair_loss_sum(images, texts, scale, self.logit_bias, positive=False)
        return total, torch.tensor(images.shape[0], dtype=torch.int)

    # --- Hugging Face weights (keye.hf.contract): a transformers SiglipModel keeps t' and b at its top level as
    # ``logit_scale`` and ``logit_bias``, shape [1] each, with the same meaning (logits · exp(t') + b).

    @classmethod
    def hf_weight_shapes(cls, config: Config) -> dict[str, tuple[int, ...]]:
        return {"logit_scale": (1,), "logit_bias": (1,)}

    @classmethod
    def hf_to_keye(cls, hf: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
        return {name: hf[name].reshape(()) for name in ("logit_scale", "logit_bias") if name in hf}  # any subset

    @classmethod
    def keye_to_hf(cls, state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
        return {name: tensor.reshape(1) for name, tensor in state.items()}


def siglip_loss_reference(images: torch.Tensor, texts: torch.Tensor, t_prime: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The plain single-process formula over the full batch (for tests and as documentation)."""
    images, texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    logits = t_prime.exp() * images @ texts.t() + bias  # (B, B)
    z = 2 * torch.eye(len(images)) - 1
    return -F.logsigmoid(z * logits).sum() / len(images)


@hookimpl
def keye_register_losses(register):
    register("siglip_sigmoid", SiglipSigmoidLoss)
