"""``keye.model.backend`` and ``keye.model.gpt_layers``: one choice of layers (TE or Megatron's local), FP8 on
top, and keye's CPU fast paths only where they are tested.

Transformer Engine is not installed here, so ``auto`` must give the local layers and an explicit TE request a
one-line error; the TE/CUDA side is ``tests/gpu/test_backend_cuda.py``. In a real process: the plain Megatron
GPT layers (what CUDA and TE runs get) and the fast ones give the same loss and gradients on the same weights,
and qwen3 builds its SwiGLU MLPs without Megatron's per-layer "Unknown MLP type" line.
"""

from __future__ import annotations

import logging

import pytest
import torch

from keye.config.schema import FP8Config
from keye.errors import KeyeUserError
from keye.model.backend import ENV, Backend, choose_backend, cpu_fast_paths, resolve_transformer_impl, transformer_engine_usable
from keye.testing.distributed import run_distributed

needs_no_te = pytest.mark.skipif(transformer_engine_usable(), reason="Transformer Engine with CUDA is usable here")


@needs_no_te
def test_auto_is_local_here_and_asking_for_te_is_one_line(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert resolve_transformer_impl() == resolve_transformer_impl("auto") == resolve_transformer_impl("local") == "local"
    for asked in ("te", "transformer_engine"):
        with pytest.raises(KeyeUserError, match=r"^transformer_impl 'transformer_engine' needs Transformer Engine "
                                                r"with CUDA") as error:
            resolve_transformer_impl(asked)
        assert "\n" not in str(error.value)
    monkeypatch.setenv(ENV, "te")  # the process-wide setting is the same choice
    with pytest.raises(KeyeUserError, match="needs Transformer Engine with CUDA"):
        resolve_transformer_impl()
    monkeypatch.setenv(ENV, "tensorrt")
    with pytest.raises(KeyeUserError, match=r"^\$KEYE_TRANSFORMER_IMPL: unknown 'tensorrt'; known: auto, local"):
        resolve_transformer_impl()
    with pytest.raises(KeyeUserError, match=r"^transformer_impl: unknown 'tensorrt'"):
        resolve_transformer_impl("tensorrt")


def test_fast_paths_only_on_the_cpu_in_fp32_and_bf16_with_local_layers():
    assert cpu_fast_paths("local", torch.float32, "cpu") and cpu_fast_paths("local", torch.bfloat16, "cpu")
    assert not cpu_fast_paths("local", torch.float16, "cpu")
    assert not cpu_fast_paths("local", torch.float32, "cuda")
    assert not cpu_fast_paths("transformer_engine", torch.float32, "cpu")


def test_fp8_is_a_separate_choice_on_top_of_the_layers():
    assert choose_backend(torch.float32, None, "local") == Backend("local", None, True)
    assert choose_backend(torch.float32, FP8Config(enabled=False, backend="te"), "local") == Backend("local", None, True)
    assert choose_backend(torch.float32, FP8Config(enabled=True, backend="torch"), "local") == Backend("local", "torch", True)
    if not transformer_engine_usable():  # here FP8 'te' is refused before the layers are looked at
        with pytest.raises(KeyeUserError, match=r"^precision.fp8 backend 'te' needs Transformer Engine with CUDA"):
            choose_backend(torch.float32, FP8Config(enabled=True, backend="te"), "local")
        return
    with pytest.raises(KeyeUserError, match=r"^precision.fp8.backend te runs on Transformer Engine layers, but "
                                            r"transformer_impl is local"):
        choose_backend(torch.float32, FP8Config(enabled=True, backend="te"), "local")


def _gpt(ctx, backend):
    """A tiny Megatron GPTModel (Qwen3-like layers) with the layers of ``backend``, finished for it."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from keye.model.backend import common_transformer_kwargs
    from keye.model.gpt_layers import finish_gpt_model, gpt_layer_spec

    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8, ffn_hidden_size=48,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", qk_layernorm=True,
        add_bias_linear=False, **common_transformer_kwargs(torch.float32, False),
        **ctx.model_parallel_kwargs(torch.float32))
    gpt = GPTModel(config=config, transformer_layer_spec=gpt_layer_spec(backend), vocab_size=64, max_sequence_length=32,
                   position_embedding_type="rope")
    return finish_gpt_model(gpt, backend)


def _plain_and_fast_layers() -> dict:
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel
    from keye.plugins import get_registry

    ctx = init_parallel(seed=11)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("megatron.core.transformer.transformer_layer").addHandler(handler)
    qwen3 = get_registry().cls("language_model", "qwen3")
    lm = qwen3(qwen3.Config(size="tiny", **qwen3.SIZES["tiny"]), BuildContext(ctx))

    torch.manual_seed(0)
    plain = _gpt(ctx, Backend("local", None, fast=False))
    fast = _gpt(ctx, Backend("local", None, fast=True))
    fast.load_state_dict(plain.state_dict())
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 16), generator=generator)
    labels = torch.randint(0, 64, (2, 16), generator=generator)
    positions = torch.arange(16).expand(2, 16)
    runs = []
    for gpt in (plain, fast):
        loss = gpt(ids, positions, None, labels=labels)
        loss.sum().backward()
        runs.append((loss.detach(), {n: p.grad for n, p in gpt.named_parameters()}))
    (loss_plain, grads_plain), (loss_fast, grads_fast) = runs
    return {
        "unknown_mlp_lines": [r for r in records if "Unknown MLP" in r],
        "qwen3_classes": sorted({type(m).__name__ for m in lm.gpt.modules()} & {"SwiGLUMLP", "MLP", "KeyeRMSNorm",
                                                                             "OneDnnColumnParallelLinear"}),
        "plain_classes": sorted({type(m).__name__ for m in plain.modules()} & {
            "MLP", "SwiGLUMLP", "RMSNorm", "KeyeRMSNorm", "TransformerLayer", "LossRowsTransformerLayer",
            "ColumnParallelLinear", "OneDnnColumnParallelLinear"}),
        "fast_classes": sorted({type(m).__name__ for m in fast.modules()} & {
            "MLP", "SwiGLUMLP", "RMSNorm", "KeyeRMSNorm", "TransformerLayer", "LossRowsTransformerLayer",
            "ColumnParallelLinear", "OneDnnColumnParallelLinear"}),
        "loss_diff": float((loss_plain - loss_fast).abs().max()),
        "grad_diff": max(float((grads_plain[n] - grads_fast[n]).abs().max()) for n in grads_plain),
        "grad_scale": max(float(g.abs().max()) for g in grads_plain.values()),
    }


def test_plain_megatron_layers_and_the_cpu_fast_paths_agree():
    [result] = run_distributed(_plain_and_fast_layers, 1)
    assert result["unknown_mlp_lines"] == []  # SwiGLUMLP is switched in after Megatron's MLP type check
    assert result["qwen3_classes"] == ["KeyeRMSNorm", "OneDnnColumnParallelLinear", "SwiGLUMLP"]
    assert result["plain_classes"] == ["ColumnParallelLinear", "MLP", "RMSNorm", "TransformerLayer"]
    assert result["fast_classes"] == ["KeyeRMSNorm", "LossRowsTransformerLayer", "OneDnnColumnParallelLinear",
                                      "SwiGLUMLP"]
    assert result["loss_diff"] < 1e-5  # the same math; oneDNN sums in another order (fp32 rounding)
    assert result["grad_diff"] <= 1e-5 * max(1.0, result["grad_scale"]), result


def _library_patches(path) -> list[str]:
    """Assignments (and setattr calls) to attributes of torch, Megatron or transformers objects in ``path``."""
    import ast

    tree = ast.parse(path.read_text())
    libraries = {"torch", "megatron", "transformers"}
    names = set(libraries)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in libraries:
            names |= {alias.asname or alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in libraries}

    def root(target):
        while isinstance(target, ast.Attribute):
            target = target.value
        return target.id if isinstance(target, ast.Name) else None

    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and node.args:
            targets = [ast.Attribute(value=node.args[0], attr="?")]
        for target in targets:
            if isinstance(target, ast.Attribute) and root(target) in names:
                found.append(f"{path}:{node.lineno}: {ast.unparse(target)}")
    return found


def test_only_the_cpu_bridge_patches_torch_or_megatron():
    """Process-wide patches live in one module, whose docstring lists them (keye/parallel/cpu_bridge.py)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    files = sorted([*(root / "keye").rglob("*.py"), *(root / "plugins").rglob("*.py")])
    patches = [line for path in files for line in _library_patches(path)]
    bridge = [line for line in patches if "/keye/parallel/cpu_bridge.py:" in line]
    assert [line for line in patches if line not in bridge] == []
    assert any("torch.cuda.current_device" in line for line in bridge)  # the scan sees the bridge's own


@needs_no_te
def test_a_blueprints_transformer_impl_is_the_process_wide_choice(monkeypatch):
    """``model.transformer_impl`` is written where every component and every started process reads it."""
    from omegaconf import OmegaConf

    from keye.model.backend import effective_impl_name, use_blueprint_impl

    monkeypatch.setenv(ENV, "local")
    unset = OmegaConf.create({"model": {"transformer_impl": None}})
    use_blueprint_impl(unset)  # null: the environment's choice stays
    assert effective_impl_name(unset) == "local" and resolve_transformer_impl() == "local"
    asked = OmegaConf.create({"model": {"transformer_impl": "te"}})
    assert effective_impl_name(asked) == "transformer_engine"
    use_blueprint_impl(asked)
    with pytest.raises(KeyeUserError, match="needs Transformer Engine with CUDA"):
        resolve_transformer_impl()  # what every component asks when its own key is null
