"""Results must not depend on the parallel layout: TP=2, PP=2, TP=2 x PP=2 and interleaved PP=2 x VPP=2
against one process.

A tiny Qwen3-like Megatron-Core ``GPTModel`` (RMSNorm, q/k-norm, SwiGLU, GQA with 4 heads in 2 groups,
RoPE, untied embeddings, fp32) takes one training step of 4 micro-batches through Megatron's own
``get_forward_backward_func()`` (so PP runs the real 1F1B or interleaved schedule), Megatron's DDP and
``finalize_model_grads``, in real gloo processes. Every layout must give the one-process loss and the
one-process gradient of every parameter, by global name, within 1e-5. The interleaved layout is the
one that goes silently wrong with Megatron's default ``batch_p2p_comm=True`` on gloo (it needs more
micro-batches than stages to show: hence 4).

Same weights everywhere: PP stages build only their own layers and so consume the RNG differently,
hence one process builds the reference weights with a fixed seed and saves a full state dict; every
layout loads its slices by global parameter name (TP shards along ``partition_dim``, in
``partition_stride`` pieces: SwiGLU's fc1 keeps [gate_r; up_r] on TP rank r). Gradients go the other
way: TP shards are gathered to full tensors and PP stages' local layer numbers made global.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F

from keye.parallel import ParallelContext, init_parallel
from keye.testing.distributed import run_distributed
from keye.testing.tensor_parallel import tp_gather, tp_shard

SEED = 1234
VOCAB, SEQ, MICRO_BATCH, MICRO_BATCHES = 128, 16, 2, 4
TOLERANCE = 1e-5
Batch = dict[str, torch.Tensor]  # {"tokens": (B, S), "labels": (B, S)}


# --- what every rank runs --------------------------------------------------------------------------


def _build_gpt(ctx: ParallelContext, vp_stage: int | None = None) -> torch.nn.Module:
    """This rank's part of the model: a pipeline stage, or one virtual-stage chunk of it."""
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        normalization="RMSNorm",
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,  # with gated_linear_unit: SwiGLU
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        **ctx.model_parallel_kwargs(torch.float32),  # sizes, pipeline_dtype, CPU init, batch_p2p_comm
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        vp_stage=vp_stage,
    )


def _global_name(model: torch.nn.Module, name: str) -> str:
    """``decoder.layers.<local>.`` → ``decoder.layers.<global>.`` (a PP stage numbers its layers from 0)."""
    for local, layer in enumerate(model.decoder.layers):
        prefix = f"decoder.layers.{local}."
        if name.startswith(prefix):
            return f"decoder.layers.{layer.layer_number - 1}." + name[len(prefix) :]
    return name


def _micro_batches() -> list[Batch]:
    """The same token ids on every rank and in every layout."""
    generator = torch.Generator().manual_seed(0)
    shape = (MICRO_BATCHES, MICRO_BATCH, SEQ + 1)  # (M, B, S+1)
    tokens = torch.randint(0, VOCAB, shape, generator=generator)
    return [{"tokens": t[:, :-1], "labels": t[:, 1:]} for t in tokens]  # M x {(B, S), (B, S)}


def _mean_loss(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = per_token.mean()  # per_token: (B, S)
    return loss, {"loss": loss.detach().clone()}  # clone: the schedule divides `loss` in place


def _forward_step(data: Iterator[Batch], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    batch = next(data)
    position_ids = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)  # (B, S)
    # Last stage: per-token loss (B, S); other stages: hidden states for the next one.
    output = model(batch["tokens"], position_ids, attention_mask=None, labels=batch["labels"])
    return output, _mean_loss


def _named_parameters(chunks: list[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) over this rank's model chunks."""
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            yield _global_name(chunk, name), param


def _train_step(
    tensor: int, pipeline: int, virtual: int | None, weights: str, save_weights: bool
) -> dict[str, Any]:
    """One forward/backward of 4 micro-batches in this layout; loss and full gradients by global name."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ctx = init_parallel(tensor=tensor, pipeline=pipeline, virtual_pipeline=virtual, seed=SEED)
    chunks = [_build_gpt(ctx, vp_stage) for vp_stage in (range(virtual) if virtual else [None])]
    if save_weights:
        torch.save({name: p.detach().clone() for name, p in _named_parameters(chunks)}, weights)
    full_weights = torch.load(weights)
    with torch.no_grad():
        for name, param in _named_parameters(chunks):
            param.copy_(tp_shard(full_weights[name], param))

    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    ddps = [DistributedDataParallel(config, ddp_config, chunk) for chunk in chunks]
    config.finalize_model_grads_func = finalize_model_grads  # sums q/k-norm grads over TP ranks
    config.no_sync_func = [ddp.no_sync for ddp in ddps] if virtual else ddps[0].no_sync
    forward_backward = get_forward_backward_func()
    losses = forward_backward(
        forward_step_func=_forward_step,
        data_iterator=[iter(_micro_batches()) for _ in chunks] if virtual else iter(_micro_batches()),
        model=ddps,
        num_microbatches=MICRO_BATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
    )
    grads = {name: tp_gather(param.main_grad, param) for name, param in _named_parameters(chunks)}
    return {
        "schedule": forward_backward.__name__,
        "loss": torch.stack([m["loss"] for m in losses]).mean().item() if ctx.is_last_stage else None,
        "grads": grads if ctx.tp_rank == 0 else {},
    }


# --- the tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """One process: the weights every layout loads, and the loss and gradients they must reproduce."""
    weights = str(tmp_path_factory.mktemp("gpt") / "weights.pt")
    [result] = run_distributed(_train_step, 1, 1, 1, None, weights, True)
    assert result["schedule"] == "forward_backward_no_pipelining"
    assert result["loss"] == pytest.approx(math.log(VOCAB), abs=0.1)  # small random init: near uniform
    assert all(grad.abs().sum() > 0 for grad in result["grads"].values()), "every parameter needs a gradient"
    return weights, result


LAYOUTS = {  # name: (tensor, pipeline, virtual pipeline, the schedule Megatron must pick)
    "tp2": (2, 1, None, "forward_backward_no_pipelining"),
    "pp2": (1, 2, None, "forward_backward_pipelining_without_interleaving"),
    "tp2xpp2": (2, 2, None, "forward_backward_pipelining_without_interleaving"),
    "pp2xvpp2": (1, 2, 2, "forward_backward_pipelining_with_interleaving"),  # wrong with batch_p2p_comm
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_gives_one_process_loss_and_grads(reference: tuple[str, dict[str, Any]], layout: str) -> None:
    weights, expected = reference
    tensor, pipeline, virtual, schedule = LAYOUTS[layout]
    ranks = run_distributed(_train_step, tensor * pipeline, tensor, pipeline, virtual, weights, False)

    assert all(r["schedule"] == schedule for r in ranks)
    [loss] = {r["loss"] for r in ranks if r["loss"] is not None}  # every last-stage rank agrees
    assert loss == pytest.approx(expected["loss"], abs=TOLERANCE)

    grads = {name: grad for r in ranks for name, grad in r["grads"].items()}  # PP stages hold disjoint params
    assert sorted(grads) == sorted(expected["grads"])
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, expected["grads"][name], atol=TOLERANCE, rtol=0, msg=lambda m: f"{name}: {m}"
        )
