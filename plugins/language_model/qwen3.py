"""Qwen3 as keye's language model, built on Megatron-Core's GPTModel.

Qwen3 in Megatron terms: pre-RMSNorm layers, GQA, RMSNorm on q and k per head before RoPE
(``qk_layernorm``), SwiGLU MLP without biases, untied input/output embeddings, rotary base 1e6.
Keye feeds it multimodal inputs through ``decoder_input`` (token embeddings with the vision embeddings
scattered in) and position ids ``[3, B, L]``.

Positions are a nested component, ``position_encoding`` (default ``mrope_time_aligned``: Keye's
time-aligned 3D M-RoPE; ``rope1d`` for plain RoPE, ``none``, or any registered scheme): it is built with
this model's ``head_dim`` and fills Megatron's rotary slot (`_SchemeAngles`), so Megatron's attention
rotates q and k by the angles the scheme computes from the ids. The data pipeline builds the same node
for the ids of each sample, and generators ask ``self.position_encoding`` for decode positions.

Named sizes (``size: tiny | small | keye_vl_8b``) are the presets in ``SIZES``; ``keye_vl_8b`` is the
released Keye-VL-8B-Preview LLM (Qwen3-8B) exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from keye import hookimpl
from keye.config import component, doc
from keye.errors import KeyeUserError
from keye.model.protocols import BuildContext
from keye.parallel import fp8 as keye_fp8


class Qwen3LanguageModel(torch.nn.Module):
    SIZES = {
        "tiny": dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, head_dim=16,
                     ffn_hidden_size=192, vocab_size=1024, max_position_embeddings=4096,
                     position_encoding={"name": "mrope_time_aligned", "mrope_section": [2, 3, 3]}),
        "small": dict(hidden_size=256, num_layers=4, num_attention_heads=4, num_query_groups=2, head_dim=64,
                      ffn_hidden_size=768, vocab_size=4096, max_position_embeddings=8192,
                      position_encoding={"name": "mrope_time_aligned", "mrope_section": [8, 12, 12]}),
        "keye_vl_8b": dict(hidden_size=4096, num_layers=36, num_attention_heads=32, num_query_groups=8, head_dim=128,
                           ffn_hidden_size=12288, vocab_size=151936, max_position_embeddings=40960,
                           position_encoding={"name": "mrope_time_aligned", "mrope_section": [16, 24, 24]}),
    }

    @dataclass
    class Config:
        size: Optional[str] = doc("Named size preset (tiny, small, keye_vl_8b); keys set beside it win.", None)
        hidden_size: int = doc("Width of the residual stream.", 4096)
        num_layers: int = doc("Decoder layers.", 36)
        num_attention_heads: int = doc("Query heads.", 32)
        num_query_groups: int = doc("Key/value heads (GQA groups).", 8)
        head_dim: int = doc("Channels per head (independent of hidden_size in Qwen3).", 128)
        ffn_hidden_size: int = doc("SwiGLU inner width.", 12288)
        vocab_size: int = doc("Vocabulary size (rows of the embedding and the output head).", 151936)
        max_position_embeddings: int = doc("Longest sequence the rotary tables are sized for.", 40960)
        rms_norm_eps: float = doc("RMSNorm epsilon (layers, q/k norms, final norm).", 1e-6)
        position_encoding: Dict[str, Any] = component(
            "position_encoding", "Positions of the tokens: ids for the data pipeline and decoding, rotary angles "
            "for attention (built with this model's head_dim). mrope_time_aligned (Keye), rope1d, none, ...",
            {"name": "mrope_time_aligned"},
        )
        init_std: float = doc("Std of the normal weight initialisation.", 0.02)
        recompute: bool = doc("Recompute each layer's activations in backward (saves memory).", False)
        pipeline_first_stage_layers: Optional[int] = doc(
            "LLM layers on the first pipeline stage, which also runs the vision encoder and projector; the rest "
            "split evenly. null: an even split. keye.model.pipeline_split.first_stage_layers suggests a value.",
            None,
        )
        attention: str = doc(
            "Core attention of the local (non-TE) spec: sdpa (PyTorch SDPA, per block of a packed causal mask; "
            "the default) or megatron (Megatron's unfused DotProductAttention).", "sdpa"
        )

    @classmethod
    def check_config(cls, config: Config, check: Any) -> None:
        """What Megatron's TransformerConfig and this class would refuse when built, for ``validate``."""
        check.count(config, "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "head_dim",
                    "ffn_hidden_size", "vocab_size", "max_position_embeddings")
        check.number(config, "rms_norm_eps", above=0)
        check.number(config, "init_std", low=0)
        check.one_of(config, "attention", ("sdpa", "megatron"))  # keye.model.sdpa_attention.ATTENTION_IMPLS
        if config.head_dim % 2:
            check.fail("head_dim", f"{config.head_dim} must be even (rotary pairs)")
        if config.num_attention_heads % config.num_query_groups:
            check.fail("num_query_groups", f"{config.num_query_groups} does not divide num_attention_heads "
                                           f"({config.num_attention_heads})")
        section = (config.position_encoding or {}).get("mrope_section")  # a scheme with per-axis frequencies
        if isinstance(section, list) and all(isinstance(n, int) for n in section) and sum(section) * 2 != config.head_dim:
            check.fail("position_encoding.mrope_section", f"{list(section)} must sum to head_dim/2 = "
                                                          f"{config.head_dim // 2}")
        tp = check.tensor
        for name in ("num_attention_heads", "ffn_hidden_size", "vocab_size"):
            check.divisible(config, name, tp, "parallel.tensor")
        if config.num_query_groups % tp and tp % config.num_query_groups:
            check.fail("num_query_groups", f"{config.num_query_groups} must be a multiple or a divisor of "
                                           f"parallel.tensor ({tp})")
        cls._check_pipeline(config, check)

    @staticmethod
    def _check_pipeline(config: Config, check: Any) -> None:
        """The layers must split over the pipeline stages (and their virtual chunks) as Megatron requires."""
        pp, vpp = check.pipeline, check.blueprint.parallel.virtual_pipeline or 1
        first = config.pipeline_first_stage_layers
        if pp == 1:
            return
        if first is None:
            if config.num_layers % (pp * vpp):
                check.fail("num_layers", f"{config.num_layers} layers do not split evenly over parallel.pipeline "
                                         f"({pp}) x virtual_pipeline ({vpp})")
            return
        rest = config.num_layers - first
        if not 1 <= first < config.num_layers or rest % (pp - 1) or first % vpp or (rest // (pp - 1)) % vpp:
            check.fail("pipeline_first_stage_layers", f"{first} on the first stage leaves {rest} of "
                       f"{config.num_layers} layers, which must split evenly over the other {pp - 1} pipeline "
                       f"stages (and each stage's share over virtual_pipeline {vpp})")

    def __init__(self, config: Config, ctx: BuildContext | None = None) -> None:
        super().__init__()
        from megatron.core.models.gpt import GPTModel

        from keye.model.backend import choose_backend
        from keye.model.gpt_layers import finish_gpt_model, gpt_layer_spec

        ctx = ctx or BuildContext()
        self.config = config
        self.position_encoding = ctx.build("position_encoding", config.position_encoding, head_dim=config.head_dim)
        self.vocab_size = config.vocab_size
        # Which layers (keye.model.backend, one decision for every Megatron-built part): Transformer Engine's
        # or Megatron's local ones, FP8 on top ('te': Megatron enters TE's autocast from the config's fp8
        # fields; 'torch': keye's scaled-FP8 linears), keye's CPU fast paths only where they are tested. Fails
        # here, in one line, if this machine cannot run the choice.
        self.backend = choose_backend(ctx.dtype, ctx.fp8)
        if getattr(ctx.parallel, "sequence_parallel", False) and self.backend.impl != "transformer_engine":
            raise KeyeUserError("parallel.sequence_parallel needs Transformer Engine layers (Megatron's local norms "
                                f"refuse it); these are {self.backend.impl}: turn it off here")
        self.transformer_config = self._transformer_config(config, ctx)
        spec = gpt_layer_spec(self.backend, config.attention)
        self.gpt = GPTModel(
            config=self.transformer_config,
            transformer_layer_spec=spec,
            vocab_size=config.vocab_size,
            max_sequence_length=config.max_position_embeddings,
            pre_process=ctx.pre_process,
            post_process=ctx.post_process,
            share_embeddings_and_output_weights=False,
            position_embedding_type="mrope",  # Megatron's one rotary path that passes the ids on: to _SchemeAngles
            parallel_output=True,
            vp_stage=ctx.vp_stage,
            scatter_embedding_sequence_parallel=False,  # forward scatters decoder_input (vision scattered in first)
        )
        self.gpt.rotary_pos_emb = _SchemeAngles(self.position_encoding, next(self.gpt.parameters()).device)
        finish_gpt_model(self.gpt, self.backend)  # SwiGLU, RMSNorm gradient, oneDNN output, loss rows: CPU only
        if ctx.parallel is not None:
            self._layout_invariant_init(config, ctx)

    def _layout_invariant_init(self, config: Config, ctx: BuildContext) -> None:
        """Megatron's init distributions, drawn per global parameter name (same weights for any TP/PP)."""
        from keye.parallel.weight_init import layout_invariant_init

        scaled = config.init_std / (2.0 * config.num_layers) ** 0.5  # Megatron's output_layer_init_method

        def std_of(name: str) -> float | None:
            if name.endswith("bias") or "norm" in name:
                return None  # zeros and ones, the same everywhere already
            if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                return scaled
            return config.init_std

        layout_invariant_init(self.gpt, ctx.seed, std_of, ctx.parallel.tp_rank, ctx.parallel.tp_size)

    @staticmethod
    def _transformer_config(config: Config, ctx: BuildContext) -> Any:
        import torch.nn.functional as F
        from megatron.core.transformer import TransformerConfig

        from keye.model.backend import common_transformer_kwargs

        layout = ctx.parallel.model_parallel_kwargs(ctx.dtype) if ctx.parallel is not None else {}
        return TransformerConfig(
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_query_groups,
            kv_channels=config.head_dim,
            ffn_hidden_size=config.ffn_hidden_size,
            gated_linear_unit=True,
            activation_func=F.silu,
            normalization="RMSNorm",
            layernorm_epsilon=config.rms_norm_eps,
            qk_layernorm=True,
            add_bias_linear=False,
            add_qkv_bias=False,
            init_method_std=config.init_std,
            mrope_section=[config.head_dim // 2, 0, 0],  # required by Megatron's mrope path; _SchemeAngles ignores it
            **common_transformer_kwargs(ctx.dtype, config.recompute),
            num_layers_in_first_pipeline_stage=(
                config.pipeline_first_stage_layers if ctx.parallel is not None and ctx.parallel.pp_size > 1 else None
            ),
            **keye_fp8.megatron_fp8_kwargs(ctx.fp8),  # TE backend only: fp8="hybrid", delayed recipe, amax history
            **layout,
        )

    # --- Hugging Face weights (keye.hf.contract.HFWeights): Qwen3ForCausalLM's names ---------------------

    @classmethod
    def hf_weight_shapes(cls, config: Config) -> dict[str, tuple[int, ...]]:
        """Every weight of ``Qwen3ForCausalLM`` with this config and its shape, written out from Qwen3's layout
        (not derived from the mapping), so a checkpoint is checked before converting."""
        h, hd, ffn, vocab = config.hidden_size, config.head_dim, config.ffn_hidden_size, config.vocab_size
        q, kv = config.num_attention_heads * hd, config.num_query_groups * hd
        layer = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, q), "self_attn.q_norm": (hd,), "self_attn.k_norm": (hd,),
                 "mlp.gate_proj": (ffn, h), "mlp.up_proj": (ffn, h), "mlp.down_proj": (h, ffn),
                 "input_layernorm": (h,), "post_attention_layernorm": (h,)}  # no biases
        shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
        for i in range(config.num_layers):
            shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in layer.items()})
        return shapes

    @classmethod
    def hf_to_keye(cls, hf: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
        """``Qwen3ForCausalLM`` tensors → this module's (``gpt.`` + Megatron GPTModel names; keye.model.hf_keys)."""
        from keye.model.hf_keys import hf_decoder_to_megatron

        return hf_decoder_to_megatron(hf, config, prefix="gpt.")

    @classmethod
    def keye_to_hf(cls, state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
        """This module's full tensors → ``Qwen3ForCausalLM`` names, tensor by tensor (inverse of :meth:`hf_to_keye`)."""
        from keye.model.hf_keys import megatron_decoder_to_hf

        return megatron_decoder_to_hf(state, config, prefix="gpt.")

    def set_input_tensor(self, tensor: torch.Tensor) -> None:
        """Pipeline stages after the first receive their input here (Megatron's schedule calls it)."""
        self.gpt.set_input_tensor(tensor)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[L, B, H]`` (Megatron's sequence-first layout); first stage only."""
        return self.gpt.embedding(input_ids=input_ids, position_ids=None)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Any,
        decoder_input: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        inference_context: Any = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, L, V/TP]``, or the per-token loss ``[B, L]`` when ``labels`` are given.

        With ``inference_context`` (Megatron's ``StaticInferenceContext``: the KV cache of the ``megatron``
        generator), Megatron's inference path runs: keys and values are cached, the logits are those of the
        last position only, gathered over TP: ``[B, 1, V]``. With ``logits_at`` (``[B, L]`` bool, no labels) only
        those positions' logits are computed (after the last attention, as with ``loss_mask``): ``[1, K, V/TP]``,
        batch-major (a generator's prefill needs each row's last position only).

        With ``loss_mask`` (``[B, L]``, nonzero where the loss counts) as well, the last layer's MLP, the
        final norm, the output layer and the cross-entropy run only at those positions
        (``keye.model.loss_rows``) and the loss is 0 elsewhere. The counted losses and all gradients are
        the same; the work skipped is everything after the last attention at every position without a
        label: image/video pads in pre-training, prompts in SFT. With sequence parallelism the output
        layer gathers the sequence itself, so every position is computed there.
        """
        from keye.model.loss_rows import aligned_rows, only_loss_rows

        gpt = self.gpt
        sequence_parallel = self.transformer_config.sequence_parallel
        if inference_context is not None:
            if sequence_parallel:
                raise KeyeUserError("qwen3: generation with parallel.sequence_parallel is not supported; generate "
                                    "from the stage's weights with it off")
            return gpt(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                       decoder_input=decoder_input, inference_context=inference_context, runtime_gather_output=True)
        if self.backend.fp8 == "te" and input_ids.numel() % 16:  # TE's FP8 GEMMs refuse other row counts
            raise KeyeUserError(f"precision.fp8 te: a batch of {tuple(input_ids.shape)} tokens; Transformer Engine's "
                                "FP8 GEMMs need a multiple of 16 rows: make the stage's sequence length one")
        if sequence_parallel and gpt.pre_process:
            decoder_input = self._scatter_sequence(self.embed(input_ids) if decoder_input is None else decoder_input)
        attention_mask, packed = self._attention_inputs(attention_mask, input_ids.shape[0], input_ids.device)
        inputs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      decoder_input=decoder_input, packed_seq_params=packed)
        rows = 16 if self.backend.fp8 else 1  # FP8 GEMMs take row counts that are multiples of 16
        if logits_at is not None and labels is None and gpt.post_process:
            if gpt.output_layer.sequence_parallel or not self.backend.fast:  # no row selection: all, then pick
                return gpt(**inputs)[logits_at][None]  # (1, K, V/TP)
            keep = aligned_rows(logits_at, rows)
            with only_loss_rows(gpt, keep):
                return gpt(**inputs)[:, logits_at[keep]]  # (1, K, V/TP): the aligned rows' extras dropped
        if (labels is None or loss_mask is None or not gpt.post_process or gpt.output_layer.sequence_parallel
                or not self.backend.fast):  # loss rows are a CPU fast path (keye.model.gpt_layers)
            return gpt(**inputs, labels=labels)
        wanted = loss_mask != 0  # (B, L)
        keep = aligned_rows(wanted, rows)
        with only_loss_rows(gpt, keep):  # the output is the kept rows, batch-major as labels[keep]
            kept_loss = gpt(**inputs, labels=labels[keep][None])  # (1, K)
        kept_loss = kept_loss * wanted[keep][None]  # rows added for alignment: computed, their loss dropped
        return kept_loss.new_zeros(labels.shape).masked_scatter(keep, kept_loss)  # (B, L)

    def _scatter_sequence(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(L, B, H)`` → this TP rank's ``(L / TP, B, H)`` slice, as Megatron's embedding would scatter it
        (``scatter_embedding_sequence_parallel`` is off so that vision features go in at full length first)."""
        from megatron.core import tensor_parallel

        tp = self.transformer_config.tensor_model_parallel_size
        if embeddings.shape[0] % tp:
            raise KeyeUserError(f"parallel.sequence_parallel: a row of {embeddings.shape[0]} tokens does not split "
                                f"over parallel.tensor ({tp}); make the stage's sequence length a multiple of it")
        return tensor_parallel.scatter_to_sequence_parallel_region(embeddings).clone()  # clone: as Megatron does

    def _attention_inputs(self, attention_mask: Any, batch: int, device: Any = None) -> tuple[Any, Any]:
        """(attention_mask, packed_seq_params) for Megatron's GPT from the mask a stage passes: a dense bool
        tensor (True = masked) or a packed row's ``PackedMask``, whose dense form is built (on ``device``)
        only where the attention takes nothing else.

        A packed row's block-causal mask becomes ``thd`` PackedSeqParams (``keye.model.packing_masks``)
        wherever the attention takes them: Transformer Engine, which would otherwise ignore the mask under
        its ``causal`` mask type and let packed samples see each other, and keye's SDPA attention, which
        then runs exactly what TE runs (same blocks, same per-token RoPE). A plain causal mask is dropped
        (the layers are causal). Any other mask stays dense for the local attentions; on TE it is a
        one-line ``KeyeUserError``, never silently ignored.
        """
        from keye.model.packing_masks import PackedMask, causal_block_lengths, packed_seq_params

        te = self.backend.impl == "transformer_engine"
        compact = isinstance(attention_mask, PackedMask)
        device = attention_mask.device if isinstance(attention_mask, torch.Tensor) else device
        if attention_mask is None or not (te or self.config.attention == "sdpa"):
            return (attention_mask.dense(device) if compact else attention_mask), None
        lengths = attention_mask.causal_lengths() if compact else causal_block_lengths(attention_mask)
        if lengths is not None and len(lengths) == 1:
            return None, None
        if lengths is not None and batch == 1:
            return None, packed_seq_params(lengths, device)
        if te:
            raise KeyeUserError(
                f"qwen3 on Transformer Engine: an attention mask of shape {tuple(attention_mask.shape)} for "
                f"{batch} row(s) is not one packed row of causal blocks, the only mask TE honours (as thd "
                "cu_seqlens); run this stage with KEYE_TRANSFORMER_IMPL=local")
        return (attention_mask.dense(device) if compact else attention_mask), None


class _SchemeAngles(torch.nn.Module):
    """Megatron's rotary slot (``GPTModel.rotary_pos_emb``) filled by the position encoding: Megatron's mrope
    path calls it with the ids ``[3, B, L]`` (and a section it does not need); the scheme returns the angles
    ``[L, B, 1, head_dim]``, or None for no rotation. Holds no parameters."""

    def __init__(self, scheme: Any, device: Any = None) -> None:
        super().__init__()
        self.scheme = scheme
        if device is not None and isinstance(scheme, torch.nn.Module):
            scheme.to(device)

    def forward(self, position_ids: torch.Tensor, mrope_section: Any = None, cp_group: Any = None) -> torch.Tensor | None:
        angles = self.scheme.rotary_pos_emb(position_ids)
        return None if angles is None else angles.to(position_ids.device)


@hookimpl
def keye_register_language_models(register):
    register("qwen3", Qwen3LanguageModel)
