"""SigLIP sigmoid loss: the ring-passing version over 2 and 3 real ranks equals the plain formula on
the whole batch, in value and in gradients (images, texts, temperature and bias)."""

import math

import pytest
import torch

from keye.testing.distributed import run_distributed
from keye_plugins.loss.siglip_sigmoid import SiglipSigmoidLoss, siglip_loss_reference

BATCH, DIM = 6, 8


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, DIM, generator=generator), torch.randn(BATCH, DIM, generator=generator)


def _rank_loss():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    images, texts = (t.chunk(world)[rank].clone().requires_grad_() for t in _data())
    loss = SiglipSigmoidLoss(SiglipSigmoidLoss.Config(init_temperature=0.3, init_bias=-1.0))
    partial_sum, count = loss(images, texts)
    total = torch.tensor([int(count)])
    dist.all_reduce(total)
    (partial_sum / total).backward()  # what Megatron's per-token-loss scaling does
    value = partial_sum.detach().clone()
    dist.all_reduce(value)
    grads = [loss.logit_scale.grad.clone(), loss.logit_bias.grad.clone()]
    for grad in grads:
        dist.all_reduce(grad)  # DDP sums parameter gradients over data-parallel ranks
    dist.destroy_process_group()
    return {"loss": value.item() / BATCH, "images": images.grad, "texts": texts.grad, "scale": grads[0], "bias": grads[1]}


def test_hand_checkable_case():
    # A single positive pair with x·y = 1, t = 1, b = 0: L = -log σ(1).
    x = torch.tensor([[1.0, 0.0]])
    loss = siglip_loss_reference(x, x, torch.tensor(0.0), torch.tensor(0.0))
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))))
    # Two orthogonal pairs: diagonal logits 1, off-diagonal 0 → (2·-logσ(1) + 2·-logσ(0)) / 2.
    x = torch.eye(2)
    expected = (2 * -math.log(1 / (1 + math.exp(-1))) + 2 * math.log(2)) / 2
    assert siglip_loss_reference(x, x, torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(expected)


def test_module_on_one_process_equals_reference():
    images, texts = _data()
    module = SiglipSigmoidLoss(SiglipSigmoidLoss.Config())
    partial_sum, count = module(images, texts)
    expected = siglip_loss_reference(images, texts, torch.tensor(math.log(10.0)), torch.tensor(-10.0))
    assert (partial_sum / count).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_ring_over_ranks_equals_the_plain_formula(world):
    images, texts = (t.clone().requires_grad_() for t in _data())
    t_prime = torch.tensor(0.3, requires_grad=True)
    bias = torch.tensor(-1.0, requires_grad=True)
    expected = siglip_loss_reference(images, texts, t_prime, bias)
    expected.backward()
    ranks = run_distributed(_rank_loss, world)
    for rank, result in enumerate(ranks):
        assert result["loss"] == pytest.approx(expected.item(), rel=1e-6)
        torch.testing.assert_close(result["images"], images.grad.chunk(world)[rank], atol=1e-6, rtol=0)
        torch.testing.assert_close(result["texts"], texts.grad.chunk(world)[rank], atol=1e-6, rtol=0)
        torch.testing.assert_close(result["scale"], t_prime.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(result["bias"], bias.grad, atol=1e-6, rtol=0)
