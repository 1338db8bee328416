"""Released Keye-VL-8B-Preview checkpoints (Hugging Face layout) ↔ keye's ``KeyeVLModel``.

The released format (spec §1.7, §2): ``config.json`` (``model_type: "Keye"``, Qwen3 keys at the top level,
``rope_scaling.mrope_section``, vision settings under ``vision_config``) and safetensors weights (one file, or
shards listed in ``model.safetensors.index.json``) named ``visual.vision_model.*``, ``mlp_AR.*``, ``model.*``
and ``lm_head.weight``. The format fixes the architecture, so this module is tied to three built-ins:
``siglip_navit``, ``patch_merge_mlp`` (norm pre_merge, act gelu) and ``qwen3`` (mrope), built through the
registry like any blueprint model.

- :func:`hf_configs` / :func:`hf_config_dict`: config.json ↔ those components' ``Config`` objects.
- :func:`expected_hf_shapes`: every weight of the format, written out from the spec (not derived from the
  mapping), so loading names each missing, unexpected or misshapen tensor *before* converting anything.
- :func:`hf_to_keye_state` / :func:`keye_to_hf_state`: full tensors, released names ↔ ``KeyeVLModel`` names
  (global layer numbers). Renames, splits and concatenations only: the round trip is bit-exact.
- :func:`load_keye_vl` / :func:`save_keye_vl`: build and load a ``KeyeVLModel``, write one back; both work
  under TP (each rank its slice) and PP (each stage its layers). :meth:`KeyeVL.hf_forward` is the released
  forward on the released processor's tensors, for a model whole in one process (TP allowed, PP = 1).
  :meth:`KeyeVL.hf_generate` is Hugging Face ``generate`` on those tensors (left-padded batches), run by the
  built-in ``megatron`` generator's KV-cache loop.

The unused released weights (SigLIP pooling ``head.*``, ``packing_position_embedding``; spec §1.1) are not
loaded but kept on the wrapper (``KeyeVL.unused``) and written back: load → save loses nothing.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from keye.errors import KeyeUserError
from keye_plugins.language_model.qwen3 import Qwen3LanguageModel
from keye_plugins.position_encoding.mrope_time_aligned import MRopeTimeAligned, get_rope_index
from keye_plugins.projector.patch_merge_mlp import PatchMergeMLP
from keye_plugins.vision_encoder.siglip_navit import SiglipNaViT

VISION_PREFIX = "visual.vision_model."
UNUSED_PREFIXES = (VISION_PREFIX + "head.", VISION_PREFIX + "embeddings.packing_position_embedding.")
LLM_PREFIX = "language_model.gpt."  # where the Qwen3 GPTModel sits inside KeyeVLModel
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- config.json ---------------------------------------------------------------------------------------
@dataclass
class KeyeVLConfigs:
    """The component settings one released config.json describes."""

    vision: SiglipNaViT.Config
    projector: PatchMergeMLP.Config
    language: Qwen3LanguageModel.Config
    mrope: MRopeTimeAligned.Config

    def model_section(self) -> SimpleNamespace:
        """What ``KeyeVLModel`` takes as a blueprint ``model`` section: one registry node per slot."""
        return SimpleNamespace(
            vision_encoder={"name": "siglip_navit", **asdict(self.vision)},
            projector={"name": "patch_merge_mlp", **asdict(self.projector)},
            language_model={"name": "qwen3", **asdict(self.language)},
        )


# What the released format fixes: any other value is a different architecture.
_FIXED = {"hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False, "use_sliding_window": False,
          "vision_config.hidden_act": "gelu_pytorch_tanh"}


def _get(cfg: dict, key: str, default: Any = KeyError, where: str = "config.json") -> Any:
    """``cfg["a"]["b"]`` for ``key="a.b"``; a missing (or null) key gives ``default`` or a one-line error."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            if default is KeyError:
                raise KeyeUserError(f"{where}: missing key '{key}'")
            return default
        node = node[part]
    return node


def hf_configs(cfg: dict, where: str = "config.json") -> KeyeVLConfigs:
    """Component configs from a released config.json (parsed); a missing or bad key is a one-line error."""
    if cfg.get("model_type", "Keye") != "Keye":
        raise KeyeUserError(f"{where}: model_type {cfg.get('model_type')!r} is not 'Keye' (Keye-VL-8B-Preview)")
    for key, value in _FIXED.items():
        if _get(cfg, key, value, where) != value:
            found = _get(cfg, key, where=where)
            raise KeyeUserError(f"{where}: {key} = {found!r} is not supported (released: {value!r})")

    def num(key: str, default: Any = KeyError, kind: type = int) -> Any:
        value = _get(cfg, key, default, where)
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool) and value > 0
        if not ok:
            raise KeyeUserError(f"{where}: {key} must be a positive {kind.__name__}, got {value!r}")
        return kind(value)

    v = "vision_config."
    heads, hidden, vision_hidden, vision_heads = (num(k) for k in (
        "num_attention_heads", "hidden_size", v + "hidden_size", v + "num_attention_heads"))
    head_dim, merge = num("head_dim", hidden // heads), num(v + "spatial_merge_size", 2)
    theta = num("rope_theta", 1e6, float)
    section = _get(cfg, "rope_scaling.mrope_section", where=where)
    if not isinstance(section, list) or [type(x) for x in section] != [int] * 3 or 2 * sum(section) != head_dim:
        raise KeyeUserError(f"{where}: rope_scaling.mrope_section {section!r} must be 3 ints summing to head_dim/2")
    if vision_hidden % vision_heads or (vision_hidden // vision_heads) % 4:
        raise KeyeUserError(f"{where}: vision head_dim (hidden_size / num_attention_heads) must divide by 4 (2D RoPE)")
    vision = SiglipNaViT.Config(
        hidden_size=vision_hidden, intermediate_size=num(v + "intermediate_size"), num_heads=vision_heads,
        num_layers=num(v + "num_hidden_layers"), patch_size=num(v + "patch_size"), image_size=num(v + "image_size"),
        layer_norm_eps=num(v + "layer_norm_eps", 1e-6, float), use_rope=True,
    )
    projector = PatchMergeMLP.Config(in_dim=vision_hidden, out_dim=hidden, merge=merge, hidden=None, act="gelu",
                                     norm="pre_merge", norm_eps=1e-5)
    language = Qwen3LanguageModel.Config(
        hidden_size=hidden, num_layers=num("num_hidden_layers"), num_attention_heads=heads,
        num_query_groups=num("num_key_value_heads", heads), head_dim=head_dim, ffn_hidden_size=num("intermediate_size"),
        vocab_size=num("vocab_size"), max_position_embeddings=num("max_position_embeddings", 40960),
        rms_norm_eps=num("rms_norm_eps", 1e-6, float), rope_theta=theta, position_embedding="mrope",
        mrope_section=list(section),
    )
    mrope = MRopeTimeAligned.Config(
        mrope_section=list(section), spatial_merge_size=merge, theta=theta, head_dim=head_dim,
        tokens_per_second=num(v + "tokens_per_second", cfg.get("tokens_per_second", 2.0), float),
        image_token_id=num("image_token_id", 151655), video_token_id=num("video_token_id", 151656),
        vision_start_token_id=num("vision_start_token_id", 151652),
    )
    return KeyeVLConfigs(vision, projector, language, mrope)


def read_config(path: str | Path) -> dict:
    """config.json of a checkpoint directory, parsed; one-line errors for a missing dir or bad JSON."""
    file = Path(path) / "config.json"
    if not file.is_file():
        what = "no config.json (not a Hugging Face Keye-VL checkpoint)" if file.parent.is_dir() else "not a directory"
        raise KeyeUserError(f"{file.parent}: {what}")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise KeyeUserError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise KeyeUserError(f"{file}: expected a JSON object")
    return cfg


def hf_config_dict(configs: KeyeVLConfigs, base: dict | None = None, dtype: torch.dtype | None = None) -> dict:
    """A released-style config.json for these components; keys of ``base`` that are not ours are kept."""
    v, p, lm, mr = configs.vision, configs.projector, configs.language, configs.mrope
    if (p.norm, p.act, p.hidden or p.in_dim * p.merge**2, lm.position_embedding, v.use_rope) != (
            "pre_merge", "gelu", p.in_dim * p.merge**2, "mrope", True):
        raise KeyeUserError("the Keye-VL-8B-Preview format needs patch_merge_mlp (norm pre_merge, act gelu, hidden "
                            "null), qwen3 with position_embedding mrope, siglip_navit with use_rope")
    cfg = dict(base or {})
    cfg.update(
        architectures=cfg.get("architectures", ["KeyeForConditionalGeneration"]), model_type="Keye",
        hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size, num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_attention_heads, num_key_value_heads=lm.num_query_groups, head_dim=lm.head_dim,
        hidden_act="silu", vocab_size=lm.vocab_size, max_position_embeddings=lm.max_position_embeddings,
        rms_norm_eps=lm.rms_norm_eps, rope_theta=lm.rope_theta, attention_bias=False, tie_word_embeddings=False,
        use_sliding_window=False, image_token_id=mr.image_token_id, video_token_id=mr.video_token_id,
        vision_start_token_id=mr.vision_start_token_id,
    )
    cfg["rope_scaling"] = {**cfg.get("rope_scaling", {"type": "mrope"}), "mrope_section": list(lm.mrope_section)}
    cfg["vision_config"] = {
        **cfg.get("vision_config", {}), "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "patch_size": v.patch_size,
        "image_size": v.image_size, "layer_norm_eps": v.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh",
        "spatial_merge_size": p.merge, "tokens_per_second": mr.tokens_per_second, "num_channels": 3,
    }
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    return cfg


# --- weight names --------------------------------------------------------------------------------------
def expected_hf_shapes(configs: KeyeVLConfigs) -> dict[str, tuple[int, ...]]:
    """Every weight of a released checkpoint with these settings (unused ones aside), and its shape."""
    v, p, lm = configs.vision, configs.projector, configs.language
    d, inner, patch, merged = v.hidden_size, v.intermediate_size, v.patch_size, v.hidden_size * p.merge**2
    h, hd, ffn = lm.hidden_size, lm.head_dim, lm.ffn_hidden_size
    q, kv = lm.num_attention_heads * hd, lm.num_query_groups * hd
    vision_layer = {  # weight and bias shapes per SigLIP layer
        "self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
        "self_attn.out_proj": (d, d), "layer_norm1": (d,), "layer_norm2": (d,),
        "mlp.fc1": (inner, d), "mlp.fc2": (d, inner),
    }
    llm_layer = {  # Qwen3 layer: no biases
        "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q), "self_attn.q_norm": (hd,), "self_attn.k_norm": (hd,), "mlp.gate_proj": (ffn, h),
        "mlp.up_proj": (ffn, h), "mlp.down_proj": (h, ffn), "input_layernorm": (h,), "post_attention_layernorm": (h,),
    }
    shapes: dict[str, tuple[int, ...]] = {
        VISION_PREFIX + "embeddings.patch_embedding.weight": (d, 3, patch, patch),
        VISION_PREFIX + "embeddings.patch_embedding.bias": (d,),
        VISION_PREFIX + "embeddings.position_embedding.weight": ((v.image_size // patch) ** 2, d),
        VISION_PREFIX + "post_layernorm.weight": (d,), VISION_PREFIX + "post_layernorm.bias": (d,),
        "mlp_AR.pre_norm.weight": (d,), "mlp_AR.pre_norm.bias": (d,),
        "mlp_AR.linear_1.weight": (merged, merged), "mlp_AR.linear_1.bias": (merged,),
        "mlp_AR.linear_2.weight": (h, merged), "mlp_AR.linear_2.bias": (h,),
        "model.embed_tokens.weight": (lm.vocab_size, h), "model.norm.weight": (h,),
        "lm_head.weight": (lm.vocab_size, h),
    }
    for i in range(v.num_layers):
        for name, shape in vision_layer.items():
            shapes[f"{VISION_PREFIX}encoder.layers.{i}.{name}.weight"] = shape
            shapes[f"{VISION_PREFIX}encoder.layers.{i}.{name}.bias"] = shape[:1]
    for i in range(lm.num_layers):
        shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in llm_layer.items()})
    return shapes


def check_hf_names(shapes: dict[str, tuple[int, ...]], configs: KeyeVLConfigs, where: str) -> list[str]:
    """Raise a ``KeyeUserError`` naming missing/unexpected/misshapen weights; return the skipped unused names."""
    expected = expected_hf_shapes(configs)
    unused = sorted(name for name in shapes if name.startswith(UNUSED_PREFIXES))
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - set(unused))
    wrong = [f"{name} {tuple(shapes[name])} (config says {expected[name]})"
             for name in sorted(set(expected) & set(shapes)) if tuple(shapes[name]) != expected[name]]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            problems.append(f"{label} weight {', '.join(names[:3])}{more}")
    if problems:
        raise KeyeUserError(f"{where}: " + "; ".join(problems))
    return unused


def hf_to_keye_state(hf: dict[str, Tensor], configs: KeyeVLConfigs) -> dict[str, Tensor]:
    """Released tensors (checked by :func:`check_hf_names`) → ``KeyeVLModel`` parameter names, full tensors."""
    from keye.hf.qwen3_weights import hf_to_keye
    from keye_plugins.vision_encoder.siglip_navit import hf_to_keye_state_dict

    vision = hf_to_keye_state_dict(hf, configs.vision.num_heads, VISION_PREFIX)
    out = {"vision_encoder." + k: t for k, t in vision.items()}
    out.update({"projector." + k[len("mlp_AR."):]: t for k, t in hf.items() if k.startswith("mlp_AR.")})
    out.update(hf_to_keye(hf, configs.language, prefix=LLM_PREFIX))
    return out


def keye_to_hf_state(state: dict[str, Tensor], configs: KeyeVLConfigs) -> dict[str, Tensor]:
    """``KeyeVLModel`` full tensors (global layer numbers) → released names (inverse of :func:`hf_to_keye_state`)."""
    from keye.hf.qwen3_weights import keye_to_hf
    from keye_plugins.vision_encoder.siglip_navit import keye_to_hf_state_dict

    vision = {k[len("vision_encoder."):]: t for k, t in state.items() if k.startswith("vision_encoder.")}
    out = keye_to_hf_state_dict(vision, configs.vision.num_heads, VISION_PREFIX)
    out.update({"mlp_AR." + k[len("projector."):]: t for k, t in state.items() if k.startswith("projector.")})
    out.update(keye_to_hf(state, configs.language, prefix=LLM_PREFIX))
    return {name: tensor.contiguous() for name, tensor in out.items()}


# --- safetensors files ---------------------------------------------------------------------------------
def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those the index lists, or the single ``model.safetensors``."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise KeyeUserError(f"{index}: not a safetensors index ({exc})") from None
        files = [path / name for name in names]
    else:
        files = [path / WEIGHTS_NAME] if (path / WEIGHTS_NAME).is_file() else sorted(path.glob("*.safetensors"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise KeyeUserError(f"{path}: weight file missing: {missing[0] if missing else WEIGHTS_NAME}")
    return files


def read_weights(path: Path) -> dict[str, Tensor]:
    """Every tensor of the checkpoint's safetensors files, by name."""
    from safetensors.torch import load_file

    return {name: tensor for file in weight_files(path) for name, tensor in load_file(str(file)).items()}


def write_weights(tensors: dict[str, Tensor], path: Path, max_shard_bytes: int | None = None) -> list[str]:
    """One ``model.safetensors``, or shards plus ``model.safetensors.index.json`` past ``max_shard_bytes``."""
    from safetensors.torch import save_file

    shards: list[dict[str, Tensor]] = [{}]
    size = total = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size, total = size + nbytes, total + nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        return [WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(path / name), metadata={"format": "pt"})
    weight_map = {tensor: name for name, shard in zip(names, shards) for tensor in shard}
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


# --- the model -----------------------------------------------------------------------------------------
def build_keye_vl_model(configs: KeyeVLConfigs, dtype: torch.dtype = torch.float32, parallel: Any = None) -> nn.Module:
    """An (untrained) ``KeyeVLModel`` for this process's place in the parallel layout (``parallel``: a
    ``ParallelContext``; default: the running one, or a single-process one started here)."""
    from megatron.core import parallel_state as mpu

    from keye.model.composition import KeyeVLModel
    from keye.model.protocols import BuildContext
    from keye.parallel import current_context, init_parallel
    from keye.plugins import get_registry

    parallel = parallel or (current_context() if mpu.model_parallel_is_initialized() else init_parallel())
    ctx = BuildContext(parallel, dtype, parallel.is_first_stage, parallel.is_last_stage)
    return KeyeVLModel(configs.model_section(), get_registry(), ctx,
                       image_token_id=configs.mrope.image_token_id, video_token_id=configs.mrope.video_token_id)


@functools.cache
def _fused_norm_names() -> dict[str, str]:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return dict(get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm").submodules.sharded_state_dict_keys_map)


def unfused_name(name: str) -> str:
    """A parameter name in the local layer spec's naming, which the HF mapping speaks.

    Transformer Engine's GPT layer spec fuses the norm before attention and before the MLP into the
    linear that follows (``self_attention.linear_qkv.layer_norm_weight``); the local spec keeps them as
    modules (``input_layernorm.weight``). Megatron's local spec declares this correspondence itself (its
    ``sharded_state_dict_keys_map``, which is also why distributed checkpoints of either spec load into
    the other); here it is read backwards.
    """
    for local, fused in _fused_norm_names().items():
        if f".{fused}" in name:
            return name.replace(f".{fused}", f".{local}")
    return name


def load_hf_into(model: nn.Module, keye_state: dict[str, Tensor]) -> None:
    """Copy full tensors (global names) into ``model``: each TP rank its slice, each PP stage its layers."""
    from keye.parallel.tp_weights import load_full_state_dict
    from keye.parallel.weight_init import global_name

    local = {name: keye_state[unfused_name(global_name(model, name))] for name, _ in model.named_parameters()}
    load_full_state_dict(model, local)


def gather_full_state(model: nn.Module) -> dict[str, Tensor] | None:
    """Full tensors by global name; collective over TP and PP ranks. Returned on the first PP stage, else None."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu

    from keye.parallel.tp_weights import full_state_dict
    from keye.parallel.weight_init import global_name

    state = {unfused_name(global_name(model, name)): t for name, t in full_state_dict(model).items()}
    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return state
    group = mpu.get_pipeline_model_parallel_group()
    first = dist.get_global_rank(group, 0)
    parts = [None] * dist.get_world_size(group) if dist.get_rank() == first else None
    dist.gather_object(state, parts, dst=first, group=group)
    if dist.get_rank() != first:
        return None
    return {name: tensor for part in parts for name, tensor in part.items()}


def causal_padding_mask(attention_mask: Tensor | None, batch: int, length: int) -> Tensor:
    """Megatron's attention mask ``[B, 1, L, L]`` bool, True = masked: causal, padded keys hidden.

    A padded query row would hide every key (all earlier keys are padding too under left padding), which
    softmax turns into NaN in some kernels: each token always sees itself, so no row is fully masked.
    Rows of real tokens are unchanged (their diagonal is a real, visible key anyway).
    """
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)  # (L, L): True above the diagonal
    mask = causal.expand(batch, 1, length, length)
    if attention_mask is not None:
        padded_keys = (attention_mask == 0).cpu().view(batch, 1, 1, length)
        mask = mask | padded_keys
    return mask & ~torch.eye(length, dtype=torch.bool)  # (B, 1, L, L)


class KeyeVL(nn.Module):
    """A loaded released checkpoint: ``model`` (``KeyeVLModel``), ``config`` (config.json dict), ``configs``.

    ``unused`` holds the released tensors the model has no use for (written back by :func:`save_keye_vl`);
    ``generation_config`` is the checkpoint's generation_config.json, if it had one.
    """

    def __init__(self, model: nn.Module, config: dict, unused: dict[str, Tensor] | None = None,
                 generation_config: dict | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.configs = hf_configs(config)
        self.unused = dict(unused or {})
        self.generation_config = generation_config

    @property
    def skipped(self) -> list[str]:
        """Names of the released weights that were not loaded (unused by the model)."""
        return sorted(self.unused)

    @staticmethod
    def _vision(pixels: Tensor | None, grid_thw: Tensor | None, patch: int, what: str) -> Any:
        from keye.model.composition import VisionInputs

        if pixels is None:
            return None
        if grid_thw is None:
            raise ValueError(f"{what} given without its grid_thw")
        pixels = pixels.reshape(pixels.shape[0], 3, patch, patch)  # (N, 3*P*P) or (N, 3, P, P) → (N, 3, P, P)
        return VisionInputs(patches=pixels, grid_thw=torch.as_tensor(grid_thw, dtype=torch.long).reshape(-1, 3))

    @torch.no_grad()
    def hf_forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                   image_grid_thw: Tensor | None = None, pixel_values_videos: Tensor | None = None,
                   video_grid_thw: Tensor | None = None, second_per_grid_ts: Tensor | None = None) -> Tensor:
        """The released model's prefill on the released processor's tensors: logits ``[B, L, V]`` (full vocab)."""
        from megatron.core import parallel_state as mpu
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        if mpu.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("hf_forward needs the whole model in this process (pipeline parallel size 1)")
        patch = self.configs.vision.patch_size
        images = self._vision(pixel_values, image_grid_thw, patch, "pixel_values")
        videos = self._vision(pixel_values_videos, video_grid_thw, patch, "pixel_values_videos")
        batch, length = input_ids.shape
        position_ids, _ = get_rope_index(input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts,
                                         attention_mask, self.configs.mrope)  # (3, B, L)
        device = next(self.model.parameters()).device
        mask = causal_padding_mask(attention_mask, batch, length).to(device)
        logits = self.model(input_ids.to(device), position_ids.to(device), mask, images=images, videos=videos)
        if mpu.get_tensor_model_parallel_world_size() > 1:
            logits = gather_from_tensor_model_parallel_region(logits)  # (B, L, V/TP) → (B, L, V)
        return logits

    @torch.no_grad()
    def hf_generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                    image_grid_thw: Tensor | None = None, pixel_values_videos: Tensor | None = None,
                    video_grid_thw: Tensor | None = None, second_per_grid_ts: Tensor | None = None, *,
                    max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, min_p: float = 0.0, eos_token_id: int | list[int] | None = None,
                    pad_token_id: int | None = None, seed: int | None = None, on_token: Any = None) -> Tensor:
        """Hugging Face ``generate`` on the released processor's tensors: ids ``[B, L + new]``.

        The batch may be left-padded (``attention_mask``); each row is split off with its own images and videos
        (the grids are listed row after row) and M-RoPE ids from the released ``get_rope_index``, and the rows go
        to the built-in ``megatron`` generator in one call: the same KV-cache decode loop as everything else in
        keye, not a second one. Rows that stop early (an ``eos_token_id``; default: config/generation_config) are
        padded with ``pad_token_id`` up to the longest, as transformers does. ``do_sample=False`` is greedy; the
        filters' off values differ from transformers' defaults (``top_k=0``, not 50). ``on_token(row, token)``
        is called for each token as it is sampled.
        """
        from keye.hf.generate import hf_generate

        return hf_generate(self, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                           video_grid_thw, second_per_grid_ts, max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, on_token=on_token)

    def _default(self, key: str) -> Any:
        """A generation setting from generation_config.json, else config.json."""
        for source in (self.generation_config or {}, self.config):
            if source.get(key) is not None:
                return source[key]
        return None

    forward = hf_forward


def load_keye_vl(path: str | Path, dtype: torch.dtype = torch.float32) -> KeyeVL:
    """Build a ``KeyeVLModel`` sized from ``path/config.json`` and load the released weights into it.

    Runs in this process's Megatron parallel state; with none initialised it starts a single-process one
    (``init_parallel()``: world 1, gloo on CPU), which patches Megatron's CUDA assumptions in this process
    on a CPU machine. Under TP each rank loads its slice (call it on every rank). Unused released weights
    (``head.*``, ``packing_position_embedding``) are skipped and listed in ``KeyeVL.skipped``; any other
    missing, unexpected or misshapen weight is a ``KeyeUserError`` naming it.
    """
    path = Path(path)
    cfg = read_config(path)
    configs = hf_configs(cfg, where=str(path / "config.json"))
    hf = read_weights(path)
    unused = check_hf_names({name: tuple(t.shape) for name, t in hf.items()}, configs, str(path))
    model = build_keye_vl_model(configs, dtype)
    load_hf_into(model, hf_to_keye_state(hf, configs))
    model.eval()
    generation = path / "generation_config.json"
    generation_config = json.loads(generation.read_text()) if generation.is_file() else None
    return KeyeVL(model, cfg, {name: hf[name] for name in unused}, generation_config)


def configs_of(model: nn.Module) -> KeyeVLConfigs:
    """The settings of a (blueprint-built) ``KeyeVLModel``; M-RoPE keys the model does not hold take the
    released values (tokens_per_second 2, vision_start_token_id 151652)."""
    if getattr(model, "vision_encoder", None) is None or getattr(model, "projector", None) is None:
        raise KeyeUserError("save_keye_vl: the Keye-VL format needs a model with a vision encoder and a projector")
    lm = model.language_model.config
    mrope = MRopeTimeAligned.Config(mrope_section=list(lm.mrope_section), theta=lm.rope_theta, head_dim=lm.head_dim,
                                    spatial_merge_size=model.projector.config.merge,
                                    image_token_id=model.image_token_id, video_token_id=model.video_token_id)
    return KeyeVLConfigs(model.vision_encoder.config, model.projector.config, lm, mrope)


def save_keye_vl(model: nn.Module, path: str | Path, *, dtype: torch.dtype | None = None,
                 max_shard_bytes: int | None = None, include_unused: bool = True,
                 extra_config: dict | None = None) -> Path | None:
    """Write ``model`` (a :class:`KeyeVL`, or a ``KeyeVLModel`` with the Preview architecture) in the released format.

    config.json, model.safetensors (sharded with an index past ``max_shard_bytes``) and, when known,
    generation_config.json; ``extra_config`` keys go into config.json last (e.g. token ids a blueprint-built
    model does not hold: ``vision_start_token_id``). Tensors keep the model's dtype unless ``dtype`` is given.
    Collective under TP/PP: call it on every rank; global rank 0 writes and returns the path, others None.
    """
    import torch.distributed as dist

    wrapper = model if isinstance(model, KeyeVL) else None
    keye_model, base = (model.model, model.config) if wrapper else (model, None)
    configs = model.configs if wrapper else configs_of(model)
    state = gather_full_state(keye_model)
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return None
    hf = keye_to_hf_state(state, configs)
    if include_unused and wrapper is not None:
        hf.update(wrapper.unused)
    if dtype is not None:
        hf = {name: tensor.to(dtype) for name, tensor in hf.items()}
    expected = expected_hf_shapes(configs)
    assert set(expected) <= set(hf), f"internal: not exported: {sorted(set(expected) - set(hf))[:3]}"
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    stored = dtype or next(iter(state.values())).dtype
    config = {**hf_config_dict(configs, base, stored), **(extra_config or {})}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if wrapper is not None and wrapper.generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(wrapper.generation_config, indent=2) + "\n")
    for stale in [out / INDEX_NAME, *out.glob("model*.safetensors")]:
        stale.unlink(missing_ok=True)
    write_weights(hf, out, max_shard_bytes)
    if dist.is_initialized():
        dist.barrier()
    return out
