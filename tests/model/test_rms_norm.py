"""``keye.model.rms_norm``: the closed-form RMSNorm gradient against fp64 autograd of ``torch.nn.RMSNorm``."""

import torch

from keye.model.rms_norm import KeyeRMSNorm, to_keye_rms_norm


def _pair(width: int) -> tuple[torch.nn.RMSNorm, torch.nn.RMSNorm]:
    reference = torch.nn.RMSNorm(width, eps=1e-6)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(width))
    ours = torch.nn.RMSNorm(width, eps=1e-6)
    ours.load_state_dict(reference.state_dict())
    return reference, to_keye_rms_norm(ours)


def test_forward_and_gradients_match_fp64_autograd() -> None:
    generator = torch.Generator().manual_seed(0)
    for shape in ((37, 1, 4, 64), (37, 2, 256), (5, 16)):  # q/k norms per head, layer norms, plain rows
        reference, ours = _pair(shape[-1])
        assert type(ours) is KeyeRMSNorm and ours.state_dict().keys() == reference.state_dict().keys()
        x = torch.randn(shape, generator=generator) * 3.0
        grad = torch.randn(shape, generator=generator)

        exact = reference.double()
        exact_x = x.double().requires_grad_()
        exact(exact_x).backward(grad.double())
        want = exact(exact_x.detach())

        ours_x = x.clone().requires_grad_()
        out = ours(ours_x)
        out.backward(grad)
        assert out.shape == x.shape and out.grad_fn.next_functions[0][0].name().startswith("_RMSNorm2D")
        torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ours_x.grad.double(), exact_x.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.weight.grad.double(), exact.weight.grad, atol=1e-5, rtol=1e-5)


def test_frozen_weight_and_other_dtypes() -> None:
    reference, ours = _pair(64)
    ours.weight.requires_grad_(False)
    x = torch.randn(8, 64, requires_grad=True)
    ours(x).sum().backward()
    assert ours.weight.grad is None and x.grad is not None
    half = torch.randn(8, 64).bfloat16()
    assert torch.equal(ours.bfloat16()(half), reference.bfloat16()(half))  # bf16: torch's own forward
