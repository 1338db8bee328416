"""The blueprint schema: what a YAML recipe may contain at the top level.

Component slots hold nodes of the form ``{name: <registry key>, <that component's Config fields>}``;
the schema types them as open dicts and `keye.config.validate` checks each one against the Config
dataclass of the component it names. Every field has a doc string, which ``keye-launch print-config``
writes as a YAML comment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from keye.config.fields import component, doc

#: The model modules a stage can train; anything not listed is frozen in that stage.
MODULES = ("vision_encoder", "projector", "language_model", "text_encoder")


@dataclass
class RunConfig:
    name: str = doc("Name of the run; used in logs and as the default output folder.", "keye-run")
    output_dir: str = doc("Where checkpoints, metrics.jsonl, summary.json and report.md go.", "runs/${run.name}")
    seed: int = doc("Seed for weights, data order and dropout.", 1234)
    checkpoint_every: int = doc(
        "Save a resumable checkpoint every N steps of a stage (0: none; stage results are always saved).", 0
    )
    keep_checkpoints: int = doc(
        "How many of a stage's newest resumable checkpoints to keep (at least 1); --resume falls back to an "
        "older one when the newest fails its checksums.", 2
    )


@dataclass
class ParallelConfig:
    tensor: int = doc("Tensor-parallel size (Megatron-Core TP).", 1)
    pipeline: int = doc("Pipeline-parallel size (Megatron-Core PP).", 1)
    virtual_pipeline: Optional[int] = doc("Interleaved pipeline chunks per rank; null for plain 1F1B. Stage kinds that build "
                                          "chunks accept it (every built-in kind but contrastive, which needs pipeline 1); "
                                          "validate refuses the others.", None)
    data: Optional[int] = doc("Data-parallel size; null derives it as world_size / (tensor * pipeline).", None)
    backend: str = doc("torch.distributed backend: auto (nccl with CUDA, gloo without), gloo or nccl.", "auto")
    sequence_parallel: bool = doc(
        "Megatron's sequence parallelism in the language model (activations outside attention and MLP split over "
        "the tensor-parallel ranks). Needs Transformer Engine layers and parallel.tensor > 1; not with "
        "precision.fp8.backend torch. The vision towers never split the sequence.", False)


@dataclass
class FP8Config:
    enabled: bool = doc("Train the linear layers in FP8.", False)
    backend: str = doc("te (Transformer Engine, GPU) or torch (scaled-FP8 linears via torch._scaled_mm; CPU and Hopper).", "te")
    amax_history: int = doc("Length of the amax history used to pick each tensor's scale.", 16)
    vision: bool = doc("Also run the vision encoder's linears in FP8 (off: only the language model's blocks, "
                       "as Megatron scopes FP8; the ViT's packed patches are then padded to a multiple of 16).", False)


@dataclass
class PrecisionConfig:
    dtype: str = doc("Parameter and activation dtype: fp32 or bf16 (master weights stay fp32).", "fp32")
    fp8: FP8Config = field(default_factory=FP8Config, metadata={"doc": "FP8 training settings."})


@dataclass
class ModelConfig:
    vision_encoder: Optional[Dict[str, Any]] = component("vision_encoder", "Vision encoder: patches → patch features.")
    projector: Optional[Dict[str, Any]] = component("projector", "Projector: patch features → LLM embeddings.")
    language_model: Optional[Dict[str, Any]] = component("language_model", "Decoder LLM.")
    text_encoder: Optional[Dict[str, Any]] = component("text_encoder", "Text tower, for the contrastive stage 0 only.")
    tokenizer: str = doc(
        "Hugging Face tokenizer directory, or 'synthetic' for the synthetic world's tiny BPE (built on the fly).",
        "synthetic",
    )
    transformer_impl: Optional[str] = doc(
        "Layers of every Megatron-built component: auto (Transformer Engine where it imports with CUDA, else "
        "Megatron's local layers), local, or transformer_engine (te). A component's own transformer_impl key "
        "overrides it; null: $KEYE_TRANSFORMER_IMPL, default auto.",
        None,
    )


@dataclass
class DataConfig:
    sources: Dict[str, Any] = doc(
        "Data sources by label; each a data_source node {name: ..., ...}.", default_factory=dict
    )
    heldout: Dict[str, Any] = doc(
        "Held-out sources by label for evaluation (data_source nodes), read in order.", default_factory=dict
    )
    mixer: Dict[str, Any] = component("data_mixer", "How the sources interleave.", {"name": "weighted"})
    video_decoder: Dict[str, Any] = component("video_decoder", "How videos are decoded.", {"name": "decord"})
    max_tokens: int = doc("Capacity of one packed sequence, in LLM tokens.", 4096)
    micro_batch_size: int = doc("Packed sequences per micro-batch on each data-parallel rank.", 1)
    global_batch_size: Optional[int] = doc("Sequences per optimiser step over all ranks; null = micro x dp.", None)
    max_bad_fraction: float = doc("Stop the run when more than this share of samples is unreadable.", 0.01)
    max_vision_patches: Optional[int] = doc(
        "Most ViT patches in one packed sequence (bounds the vision encoder's memory); null: no cap.", None
    )
    pack_buffer: int = doc("Processed samples gathered before packing them into sequences.", 64)
    balance: str = doc(
        "shard: each data-parallel rank reads and packs its own share. flops (next-token training): each rank "
        "reads its share of a round (pack_buffer samples), the ranks exchange sizes read from headers, deal "
        "the samples by the paper's greedy rule (heaviest estimated FLOPs first, to the least-loaded rank) and "
        "each decodes only its own; evens out step times (keye.data.balance).",
        "shard",
    )
    over_budget: str = doc(
        "A sample longer than max_tokens (e.g. several large images): skip (counted as over_budget in the stage "
        "summary, apart from bad input: it never counts toward max_bad_fraction) or error (stop, naming it).",
        "skip",
    )
    image_min_tokens: int = doc("Fewest LLM tokens per image (smaller images are upscaled).", 4)
    image_max_tokens: int = doc("Most LLM tokens per image: 16384 in the paper (1280 in the released processor).", 16384)
    video_fps: float = doc("Frame sampling rate of videos; the real rate is recomputed from the frame count.", 2.0)
    video_frame_tokens: List[int] = doc("[min, max] LLM tokens per video frame.", default_factory=lambda: [128, 768])
    video_max_tokens: int = doc("Most LLM tokens per video (the paper's 24576, enforced by sampling fewer frames).", 24576)


@dataclass
class OptimizerConfig:
    lr: float = doc("Peak learning rate.", 1e-4)
    lr_scale: Dict[str, float] = doc(
        "Per-module multipliers of lr, e.g. {vision_encoder: 0.1}.", default_factory=dict
    )
    weight_decay: float = doc("Decoupled weight decay (AdamW).", 0.0)
    beta1: float = doc("Adam beta1.", 0.9)
    beta2: float = doc("Adam beta2.", 0.95)
    eps: float = doc("Adam epsilon.", 1e-8)
    clip_grad: float = doc("Clip the global gradient norm to this value; 0 disables.", 1.0)


@dataclass
class ScheduleConfig:
    kind: str = doc("constant, cosine (warmup + cosine) or wsd (warmup-stable-decay).", "cosine")
    warmup_steps: int = doc("Linear warmup steps.", 0)
    min_lr_ratio: float = doc("Final learning rate as a share of the peak.", 0.1)
    decay_fraction: float = doc("wsd only: share of the steps spent in the final decay (the low-LR anneal).", 0.1)


@dataclass
class StageConfig:
    name: str = doc("Label of the stage, unique in the blueprint (used by --stage and in checkpoints).", MISSING)
    kind: str = doc("Registered stage component that runs the step loop (e.g. contrastive, lm, merge).", MISSING)
    train: List[str] = doc(
        f"Modules that train in this stage ({', '.join(MODULES)}); the rest are frozen.", default_factory=list
    )
    steps: int = doc("Optimiser steps in this stage.", 0)
    init_from: Any = doc(
        "Where the stage's weights start (keye.train.stage_weights): null = the previous stage; an earlier stage's "
        "name; a folder (a stage's or `convert`'s output with weights/, or a Hugging Face directory); fresh; or per "
        "module {vision_encoder: stage0_vit, language_model: /ckpt/Qwen3-8B, projector: fresh} (modules not named "
        "come from the previous stage).", None)
    loss: Optional[Dict[str, Any]] = component("loss", "Training objective of the stage.")
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Input data of the stage."})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig, metadata={"doc": "Optimiser settings."})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"doc": "Learning-rate schedule."})
    options: Dict[str, Any] = doc("Settings of the stage kind, checked against its Config.", default_factory=dict)


@dataclass
class EvalConfig:
    every: int = doc("Evaluate every N steps within a stage (0: only at the end of each stage).", 0)
    max_samples: int = doc("Held-out samples per evaluation.", 256)


@dataclass
class Blueprint:
    extends: List[str] = doc("Blueprints this one builds on, relative to this file; later entries win.", default_factory=list)
    run: RunConfig = field(default_factory=RunConfig, metadata={"doc": "Run identity and output."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "Model components."})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={"doc": "TP / PP / DP layout."})
    precision: PrecisionConfig = field(default_factory=PrecisionConfig, metadata={"doc": "Numeric precision."})
    stages: List[StageConfig] = doc(
        "Stages, run in order. An item {repeat: K, stages: [...]} runs its stages K rounds in a row, "
        "expanded when the file is read (names get _r1.._rK; keye.config.repeat).", default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": "Evaluation settings."})
