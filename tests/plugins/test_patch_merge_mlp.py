"""The 2x2 patch-merge projector (spec §1.2): merge order by hand and vs a loop, the MLP vs hand-written math,
released parameter names and shapes."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from keye_plugins.projector.patch_merge_mlp import PatchMergeMLP, merge_index


def loop_merge(x: torch.Tensor, grids: list[tuple[int, int, int]], m: int = 2) -> torch.Tensor:
    """The rearrange "(t h p1 w p2) d -> (t h w) (p1 p2 d)" written as plain loops, grid after grid."""
    out, offset = [], 0
    for t, h, w in grids:
        patch = lambda f, r, c: x[offset + f * h * w + r * w + c]  # noqa: E731  raster order
        for f in range(t):
            for i in range(h // m):
                for j in range(w // m):
                    out.append(torch.cat([patch(f, m * i + p1, m * j + p2) for p1 in range(m) for p2 in range(m)]))
        offset += t * h * w
    return torch.stack(out)


def test_merge_by_hand_1x4x4():
    x = torch.arange(16.0)[:, None]  # patch k has the single feature k
    merged = PatchMergeMLP(PatchMergeMLP.Config(in_dim=1, out_dim=2)).merge_patches(x, torch.tensor([[1, 4, 4]]))
    assert merged.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_merge_matches_loop():
    torch.manual_seed(0)
    grids = [(1, 4, 6), (3, 2, 4), (1, 6, 2), (2, 4, 4)]
    x = torch.randn(sum(t * h * w for t, h, w in grids), 5)
    module = PatchMergeMLP(PatchMergeMLP.Config(in_dim=5, out_dim=3))
    torch.testing.assert_close(module.merge_patches(x, torch.tensor(grids)), loop_merge(x, grids), atol=0, rtol=0)
    # merge 3 as well: the index is not specific to 2x2
    grids3 = [(1, 3, 6), (2, 3, 3)]
    x3 = torch.randn(sum(t * h * w for t, h, w in grids3), 2)
    torch.testing.assert_close(x3[merge_index(torch.tensor(grids3), 3)].reshape(-1, 18), loop_merge(x3, grids3, 3))


@pytest.mark.parametrize("norm", ["pre_merge", "post_merge"])
def test_forward_matches_hand_written_math(norm):
    torch.manual_seed(0)
    grids = [(1, 4, 4), (2, 2, 4)]
    n, d = 32, 6
    module = PatchMergeMLP(PatchMergeMLP.Config(in_dim=d, out_dim=7, norm=norm))
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    x = torch.randn(n, d, dtype=torch.float64)
    module = module.double()

    def layer_norm(v: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
        mean = v.mean(-1, keepdim=True)
        var = ((v - mean) ** 2).mean(-1, keepdim=True)
        return (v - mean) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias

    if norm == "pre_merge":
        assert module.pre_norm.normalized_shape == (d,)
        h = loop_merge(layer_norm(x, module.pre_norm), grids)
    else:
        assert module.pre_norm.normalized_shape == (4 * d,)
        h = layer_norm(loop_merge(x, grids), module.pre_norm)
    h = h @ module.linear_1.weight.T + module.linear_1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    want = h @ module.linear_2.weight.T + module.linear_2.bias
    got = module(x, torch.tensor(grids))
    assert got.shape == (n // 4, 7)
    torch.testing.assert_close(got, want)


def test_swiglu_variant():
    torch.manual_seed(0)
    module = PatchMergeMLP(PatchMergeMLP.Config(in_dim=8, out_dim=5, hidden=12, act="swiglu", norm="post_merge"))
    assert module.linear_1.weight.shape == (24, 32)  # [gate; up]
    assert module.linear_2.weight.shape == (5, 12)
    x = torch.randn(3 * 16, 8)
    out = module(x, torch.tensor([[3, 4, 4]]))
    assert out.shape == (12, 5)
    merged = module.pre_norm(module.merge_patches(x, torch.tensor([[3, 4, 4]])))
    gate, up = module.linear_1(merged).chunk(2, dim=-1)
    torch.testing.assert_close(out, module.linear_2(torch.nn.functional.silu(gate) * up))


def test_released_names_and_shapes():
    with torch.device("meta"):
        module = PatchMergeMLP()
    shapes = {name: tuple(p.shape) for name, p in module.state_dict().items()}
    assert shapes == {
        "pre_norm.weight": (1152,), "pre_norm.bias": (1152,),
        "linear_1.weight": (4608, 4608), "linear_1.bias": (4608,),
        "linear_2.weight": (4096, 4608), "linear_2.bias": (4096,),
    }
    assert module.out_dim == 4096
    assert module.pre_norm.eps == 1e-5


def test_bad_input_is_a_clear_error():
    module = PatchMergeMLP(PatchMergeMLP.Config(in_dim=4, out_dim=4))
    with pytest.raises(ValueError, match=r"15 patch features but grid_thw \[\[1, 4, 4\]\] describes 16"):
        module(torch.randn(15, 4), torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match=r"grid \(t=1, h=3, w=4\) is not divisible by merge 2"):
        module(torch.randn(12, 4), torch.tensor([[1, 3, 4]]))
    with pytest.raises(ValueError, match="act must be one of gelu, swiglu"):
        PatchMergeMLP(PatchMergeMLP.Config(act="relu"))


def test_config_is_a_blueprint_schema():
    node = OmegaConf.merge(OmegaConf.structured(PatchMergeMLP.Config), {"norm": "post_merge", "hidden": 64})
    config = OmegaConf.to_object(node)
    assert config == PatchMergeMLP.Config(hidden=64, norm="post_merge")
    assert OmegaConf.to_object(OmegaConf.structured(PatchMergeMLP.Config)).hidden is None


def test_registers_through_its_hook(keye_empty_host):
    import keye_plugins.projector.patch_merge_mlp as plugin

    keye_empty_host.add_plugin(plugin, "patch_merge_mlp")
    assert keye_empty_host.registry.cls("projector", "patch_merge_mlp") is PatchMergeMLP


# --- tensor parallelism: TP=2 in real processes against the plain single-process module ------------

TP_GRIDS = [(1, 4, 4), (2, 2, 4), (1, 2, 6)]  # two images of different sizes and a 2-frame video
TP_CONFIGS = {
    "gelu_pre_merge": dict(in_dim=6, out_dim=10, hidden=12),
    "swiglu_post_merge": dict(in_dim=6, out_dim=10, hidden=12, act="swiglu", norm="post_merge"),
}


def _tp_inputs(name: str) -> tuple[PatchMergeMLP.Config, torch.Tensor, torch.Tensor]:
    """The config, patch features ``(N, in_dim)`` and the output weighting ``(N/4, out_dim)`` of a case."""
    config = PatchMergeMLP.Config(**TP_CONFIGS[name])
    generator = torch.Generator().manual_seed(1)
    n = sum(t * h * w for t, h, w in TP_GRIDS)
    features = torch.randn(n, config.in_dim, generator=generator)
    weighting = torch.randn(n // 4, config.out_dim, generator=generator)  # makes every output matter
    return config, features, weighting


def _forward_backward(module: PatchMergeMLP, name: str) -> dict[str, torch.Tensor]:
    """Output, loss, input gradient and parameter gradients of ``sum(out * weighting)``."""
    _, features, weighting = _tp_inputs(name)
    features.requires_grad_(True)
    out = module(features, torch.tensor(TP_GRIDS))
    loss = (out * weighting).sum()
    loss.backward()
    return {"out": out.detach(), "loss": loss.detach(), "input_grad": features.grad}


def _tp2_rank() -> dict[str, dict]:
    """Every TP case on this rank of a TP=2 group (one spawn for all cases: starting ranks is the slow part)."""
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel
    from keye.testing.tensor_parallel import tp_gather

    ctx = init_parallel(tensor=2, pipeline=1, seed=99)
    results = {}
    for name in TP_CONFIGS:
        config, _, _ = _tp_inputs(name)
        torch.manual_seed(0)  # the same draws as the single-process build in the test
        module = PatchMergeMLP(config, BuildContext(parallel=ctx))
        result = _forward_backward(module, name)
        result["types"] = {n: type(m).__name__ for n, m in module.named_children()}
        result["local_shapes"] = {n: tuple(p.shape) for n, p in module.named_parameters()}
        result["linear_1_local"] = module.linear_1.weight.detach().clone()
        result["weights"] = {n: tp_gather(p, p) for n, p in module.named_parameters()}
        result["grads"] = {n: tp_gather(p.grad, p) for n, p in module.named_parameters()}
        results[name] = result
    return results


@pytest.fixture(scope="module")
def tp2_ranks() -> list[dict[str, dict]]:
    from keye.testing.distributed import run_distributed

    return run_distributed(_tp2_rank, 2)


@pytest.mark.parametrize("name", TP_CONFIGS)
def test_tp2_equals_one_process(tp2_ranks: list[dict[str, dict]], name: str) -> None:
    config, _, _ = _tp_inputs(name)
    torch.manual_seed(0)
    plain = PatchMergeMLP(config)  # no parallel state: plain nn.Linear
    expected = _forward_backward(plain, name)
    expected_grads = {n: p.grad for n, p in plain.named_parameters()}
    hidden = config.hidden * (2 if config.act == "swiglu" else 1)

    for rank, r in enumerate(ranks[name] for ranks in tp2_ranks):
        assert r["types"] == {
            "pre_norm": "LayerNorm", "linear_1": "ColumnParallelLinear", "linear_2": "RowParallelLinear"
        }
        assert r["local_shapes"] == {  # released names, each rank holding half of each linear
            "pre_norm.weight": plain.pre_norm.weight.shape, "pre_norm.bias": plain.pre_norm.bias.shape,
            "linear_1.weight": (hidden // 2, 4 * config.in_dim), "linear_1.bias": (hidden // 2,),
            "linear_2.weight": (config.out_dim, config.hidden // 2), "linear_2.bias": (config.out_dim,),
        }
        for n, p in plain.named_parameters():  # the same initial weights as TP=1
            torch.testing.assert_close(r["weights"][n], p.detach(), atol=0, rtol=0, msg=n)
        if config.act == "swiglu":  # rank r holds [gate_r; up_r]: its chunk(2) pairs gate and up units
            gate, up = plain.linear_1.weight.detach().chunk(2)
            half = config.hidden // 2
            want = torch.cat([gate[rank * half:(rank + 1) * half], up[rank * half:(rank + 1) * half]])
            torch.testing.assert_close(r["linear_1_local"], want, atol=0, rtol=0)
        for key in ("out", "loss", "input_grad"):
            torch.testing.assert_close(r[key], expected[key], atol=1e-6, rtol=1e-5, msg=lambda m: f"{key}: {m}")
        for n, grad in expected_grads.items():
            torch.testing.assert_close(r["grads"][n], grad, atol=1e-6, rtol=1e-5, msg=lambda m: f"grad {n}: {m}")
