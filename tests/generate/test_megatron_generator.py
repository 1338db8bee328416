"""The built-in ``megatron`` generator on a tiny released-format checkpoint, against no-cache recomputes.

The model is a tiny Keye-VL (SigLIP ViT → projector → Qwen3 with M-RoPE) built from a released-style
config.json, given O(1) random weights, written with ``save_keye_vl`` and read back with ``load_keye_vl``:
the generator runs on the loaded model, and the reference is that checkpoint's released-format forward
``KeyeVL.hf_forward`` (tested against a float64 spec reference in tests/hf), run in a greedy loop with no
cache: the whole sequence again at every step, positions from the released ``get_rope_index``.

Three prompts of different lengths go in one batch: a chat-rendered prompt with an image (think mode), a
text-only one (no_think, n=2), and a hand-made one with a video and an image (n=3, M-RoPE ids left for the
generator to compute). Greedy tokens must equal the reference token for token, both for each prompt alone
and for the released code's own left-padded batch. Everything runs in one spawned process (Megatron state is
per process) and the tests below check parts of its answer.
"""

from __future__ import annotations

import io
import random
import time
from pathlib import Path

import pytest
import torch

from keye.testing.distributed import run_distributed

NEW = 6  # tokens per generation
SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02)


def tiny_tokenizer():
    from keye.data.tokenizer import build_tiny_tokenizer

    words = ["red", "circle", "square", "left", "right", "how", "many", "there", "two", "three", "blue", "green",
             "the", "answer", "is", "think"]
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    tokenizer = build_tiny_tokenizer(corpus, vocab_size=320)
    assert len(tokenizer) == 320  # every id the model can emit decodes
    return tokenizer


def tiny_config(tokenizer) -> dict:
    from keye.data.tokenizer import SpecialTokens

    special = SpecialTokens.from_tokenizer(tokenizer)
    return {
        "architectures": ["KeyeForConditionalGeneration"], "model_type": "Keye", "torch_dtype": "float32",
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "attention_bias": False,
        "attention_dropout": 0.0, "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": None,
        "bos_token_id": special.pad, "eos_token_id": special.eos, "vision_start_token_id": special.vision_start,
        "vision_end_token_id": special.vision_end, "image_token_id": special.image_pad,
        "video_token_id": special.video_pad,
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_channels": 3, "image_size": 56, "patch_size": 14,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "tokens_per_second": 2,
        },
    }


def png(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def requests(tokenizer, special) -> list:
    """Three prompts of different lengths (see the module docstring)."""
    from keye.data.processor import Processor, ProcessorSettings
    from keye.data.sample import ImagePart, ImageRef, Message, TextPart
    from keye.generate.contract import GenerationRequest
    from keye.generate.prompts import conversation_request
    from keye.model.composition import VisionInputs

    processor = Processor(tokenizer, ProcessorSettings(image_min_tokens=4, image_max_tokens=16))
    media = {"a.png": png(56, 56, 0)}
    with_image = [Message("user", [ImagePart(ImageRef(path="a.png")), TextPart("how many red circle")])]
    text_only = [Message("user", [TextPart("the answer is two blue square left")])]
    gen = torch.Generator().manual_seed(3)
    words = tokenizer.encode("how many green square there", add_special_tokens=False)
    video_block = [special.vision_start] + [special.video_pad] * 8 + [special.vision_end]  # (2, 4, 4): 8 tokens
    image_block = [special.vision_start] + [special.image_pad] * 6 + [special.vision_end]  # (1, 4, 6): 6 tokens
    by_hand = GenerationRequest(
        words[:2] + video_block + words[2:] + image_block + words[:1],
        videos=VisionInputs(torch.randn(32, 3, 14, 14, generator=gen), torch.tensor([[2, 4, 4]])),
        images=VisionInputs(torch.randn(24, 3, 14, 14, generator=gen), torch.tensor([[1, 4, 6]])),
        video_seconds=[0.75], n=3,
    )
    return [
        conversation_request(with_image, processor, "think", media=media),
        conversation_request(text_only, processor, "no_think", n=2),
        by_hand,
    ]


def hf_inputs(request) -> dict:
    """The released forward's keyword arguments for a request's vision."""
    images, videos = request.images, request.videos
    return dict(
        pixel_values=images.patches if images is not None else None,
        image_grid_thw=images.grid_thw if images is not None else None,
        pixel_values_videos=videos.patches if videos is not None else None,
        video_grid_thw=videos.grid_thw if videos is not None else None,
        second_per_grid_ts=torch.tensor(request.video_seconds) if request.video_seconds else None,
    )


def reference_greedy_alone(keye, request) -> tuple[list[int], float]:
    """No cache: the whole sequence through the released forward at every step. Also the smallest top-1 margin."""
    ids = request.prompt_ids[None]
    margin = float("inf")
    for _ in range(NEW):
        last = keye.hf_forward(ids, **hf_inputs(request))[0, -1]  # (V,)
        top = last.topk(2).values
        margin = min(margin, float(top[0] - top[1]))
        ids = torch.cat([ids, last.argmax().view(1, 1)], dim=1)
    return ids[0, request.prompt_ids.numel():].tolist(), margin


def padded_batch(reqs) -> dict:
    """The released processor's batch: left padding, attention_mask, every row's vision packed in order."""
    length = max(r.prompt_ids.numel() for r in reqs)
    ids = torch.zeros(len(reqs), length, dtype=torch.long)
    mask = torch.zeros(len(reqs), length, dtype=torch.long)
    for b, r in enumerate(reqs):
        ids[b, length - r.prompt_ids.numel():] = r.prompt_ids
        mask[b, length - r.prompt_ids.numel():] = 1
    parts = [hf_inputs(r) for r in reqs]

    def cat(key):
        found = [p[key] for p in parts if p[key] is not None]
        return torch.cat(found) if found else None

    return dict(input_ids=ids, attention_mask=mask, **{key: cat(key) for key in parts[0]})


def reference_greedy_padded(keye, reqs) -> list[list[int]]:
    """The released code's batch (`padded_batch`) run as a no-cache greedy loop of the released forward."""
    vision = padded_batch(reqs)
    ids, mask = vision.pop("input_ids"), vision.pop("attention_mask")
    length = ids.shape[1]
    for _ in range(NEW):
        last = keye.hf_forward(ids, attention_mask=mask, **vision)[:, -1]  # (B, V)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones(len(reqs), 1, dtype=torch.long)], dim=1)
    return ids[:, length:].tolist()


def recomputed_logprobs(keye, request, tokens: list[int], settings: dict | None) -> list[float]:
    """Each generated token's log-prob from one full forward of prompt + tokens, under the same filtering."""
    from keye.generate.sampling import filter_logits

    full = torch.cat([request.prompt_ids, torch.tensor(tokens, dtype=torch.long)])[None]
    start = request.prompt_ids.numel() - 1
    logits = keye.hf_forward(full, **hf_inputs(request))[0, start:start + len(tokens)]  # (k, V)
    scores = logits if settings is None else filter_logits(logits, **settings)
    return scores.float().log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()


def write_checkpoint(path: Path, tokenizer) -> None:
    """A released-format tiny checkpoint with O(1) activations and well-separated logits (not Megatron's
    0.02 init, whose near-flat logits would make greedy choices near-ties). Needs one Megatron process."""
    from keye.hf import hf_configs, save_keye_vl
    from keye.hf.keye_vl import build_keye_vl_model

    torch.manual_seed(0)
    built = build_keye_vl_model(hf_configs(tiny_config(tokenizer)))
    with torch.no_grad():
        for name, param in built.named_parameters():
            if "word_embeddings" in name:
                param.normal_(0.0, 1.0)
            elif param.dim() >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5)
    save_keye_vl(built, path)


def _generate_all(root: str) -> dict:
    from keye.data.tokenizer import SpecialTokens
    from keye.errors import KeyeUserError
    from keye.generate.contract import GeneratorContext, SamplingSettings
    from keye.hf import hf_configs, load_keye_vl
    from keye.hf.files import read_config, read_weights
    from keye.hf.keye_vl import build_keye_vl_model
    from keye.hf.weights import hf_to_keye_state, load_hf_into
    from keye.plugins import get_registry

    tokenizer = tiny_tokenizer()
    special = SpecialTokens.from_tokenizer(tokenizer)
    write_checkpoint(Path(root) / "ckpt", tokenizer)
    keye = load_keye_vl(Path(root) / "ckpt")
    reqs = requests(tokenizer, special)
    Generator = get_registry().cls("generator", "megatron")
    generator = Generator(Generator.Config(), GeneratorContext(model=keye.model, tokenizer=tokenizer))
    out: dict = {"lengths": [r.prompt_ids.numel() for r in reqs], "modes": [r.thinking_mode for r in reqs],
                 "kv_cache": generator.kv_cache(), "decode_path": generator.decode_path()}

    def run(settings, gen=generator):
        outputs = gen.generate(reqs, settings)
        return [[(s.token_ids, s.logprobs, s.finish_reason, s.stop_reason) for s in o.samples] for o in outputs]

    start = time.perf_counter()
    greedy = run(SamplingSettings(max_new_tokens=NEW, temperature=0.0))
    out["greedy_seconds"] = time.perf_counter() - start
    out["greedy"] = greedy
    try:
        generator.generate(reqs[:1], SamplingSettings(max_new_tokens=1024))
    except KeyeUserError as error:
        out["window_error"] = str(error)
    out["modes_back"] = [o.thinking_mode for o in generator.generate(reqs[:2], SamplingSettings(max_new_tokens=1))]
    small = Generator(Generator.Config(max_batch_size=3), GeneratorContext(model=keye.model, tokenizer=tokenizer))
    out["greedy_small_batches"] = run(SamplingSettings(max_new_tokens=NEW, temperature=0.0), small)
    modules = Generator(Generator.Config(lean_decode=False), GeneratorContext(model=keye.model, tokenizer=tokenizer))
    out["modules_decode_path"] = modules.decode_path()
    out["greedy_modules"] = run(SamplingSettings(max_new_tokens=NEW, temperature=0.0), modules)
    out["sampled_modules"] = run(SamplingSettings(max_new_tokens=NEW, seed=7, **SAMPLED), modules)
    megatron = Generator(Generator.Config(kv_cache="megatron"), GeneratorContext(model=keye.model, tokenizer=tokenizer))
    out["greedy_megatron_cache"] = run(SamplingSettings(max_new_tokens=NEW, temperature=0.0), megatron)
    out["sampled_megatron_cache"] = run(SamplingSettings(max_new_tokens=NEW, seed=7, **SAMPLED), megatron)
    # the same weights with Megatron's own core attention (no keye cache there): the static context serves it
    configs = hf_configs(read_config(Path(root) / "ckpt"))
    configs.language.attention = "megatron"
    unfused = build_keye_vl_model(configs)
    load_hf_into(unfused, hf_to_keye_state(read_weights(Path(root) / "ckpt"), configs))
    fallback = Generator(Generator.Config(), GeneratorContext(model=unfused.eval(), tokenizer=tokenizer))
    out["fallback_cache"] = fallback.kv_cache()
    out["fallback_decode_path"] = fallback.decode_path()
    out["greedy_megatron_attention"] = run(SamplingSettings(max_new_tokens=NEW, temperature=0.0), fallback)
    start = time.perf_counter()
    alone = [reference_greedy_alone(keye, r) for r in reqs]
    out["reference_seconds"] = time.perf_counter() - start
    out["reference_alone"] = [tokens for tokens, _ in alone]
    out["reference_margin"] = min(margin for _, margin in alone)
    out["reference_padded"] = reference_greedy_padded(keye, reqs)
    out["greedy_recomputed"] = [
        [recomputed_logprobs(keye, r, s[0], None) for s in samples] for r, samples in zip(reqs, greedy)
    ]

    sampled = SamplingSettings(max_new_tokens=NEW, seed=7, **SAMPLED)
    out["sampled"] = run(sampled)
    out["sampled_again"] = run(sampled)
    out["sampled_other_seed"] = run(SamplingSettings(max_new_tokens=NEW, seed=8, **SAMPLED))
    out["sampled_recomputed"] = [
        [recomputed_logprobs(keye, r, s[0], SAMPLED) for s in samples] for r, samples in zip(reqs, out["sampled"])
    ]

    # stops: a token id the greedy run of prompt 1 emits third, and a string its decoded text holds
    g1 = greedy[1][0][0]
    out["stop_id"] = g1[2]
    out["stopped_by_id"] = run(SamplingSettings(max_new_tokens=NEW, temperature=0.0, stop_token_ids=(g1[2],)))
    pieces = [tokenizer.decode([t], skip_special_tokens=False) for t in g1[2:]]
    out["stop_string"] = next(p.strip() for p in pieces if p.strip())
    out["stopped_by_string"] = run(
        SamplingSettings(max_new_tokens=NEW, temperature=0.0, stop_strings=(out["stop_string"],))
    )
    out["decoded_greedy"] = [
        [[tokenizer.decode(s[0][:k], skip_special_tokens=False) for k in range(1, NEW + 1)] for s in samples]
        for samples in greedy
    ]
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict:
    [result] = run_distributed(_generate_all, 1, str(tmp_path_factory.mktemp("generate")))
    return result


def test_prompts_have_different_lengths_and_the_reference_is_not_at_a_tie(generated):
    assert len(set(generated["lengths"])) == 3
    assert generated["reference_margin"] > 1e-3  # greedy choices are clear, so token equality is meaningful
    assert generated["modes_back"] == ["think", "no_think"]


def test_a_prompt_past_the_window_is_one_clear_line(generated):
    assert generated["window_error"] == (
        f"megatron generator: prompt of {generated['lengths'][0]} tokens + max_new_tokens 1024 exceeds the "
        "model's window of 1024 positions"
    )


def test_greedy_with_cache_equals_the_no_cache_released_forward(generated):
    greedy = generated["greedy"]
    assert [len(samples) for samples in greedy] == [1, 2, 3]
    assert generated["kv_cache"] == "keye"  # the default on keye's SDPA attention
    for samples, alone, padded in zip(greedy, generated["reference_alone"], generated["reference_padded"]):
        assert len(set(alone)) > 2  # not one repeated token
        for tokens, _, reason, stop in samples:  # every sample of a greedy prompt: the same tokens
            assert tokens == alone == padded
            assert (reason, stop) == ("length", None)
    for small, full in zip(generated["greedy_small_batches"], greedy):  # in two batches: the same, up to rounding
        for (tokens, logprobs, *rest), (tokens_full, logprobs_full, *rest_full) in zip(small, full):
            assert (tokens, rest) == (tokens_full, rest_full)
            assert logprobs == pytest.approx(logprobs_full, abs=1e-5)


def test_lean_decode_steps_equal_the_model_forward(generated):
    """The default decode steps (keye.generate.lean_decode: the layers' weights in one loop) against the model's
    own forward with the same cache: the same tokens, log-probs within fp32 rounding (other GEMM kernels)."""
    assert generated["decode_path"] == "lean"
    assert generated["modules_decode_path"] == "model forward: lean_decode is off"
    for name in ("greedy", "sampled"):
        for modules, lean in zip(generated[f"{name}_modules"], generated[name]):
            for (tokens, logprobs, *rest), (tokens_lean, logprobs_lean, *rest_lean) in zip(modules, lean):
                assert (tokens, rest) == (tokens_lean, rest_lean)
                assert logprobs == pytest.approx(logprobs_lean, abs=1e-5)


def test_megatron_static_context_gives_the_same_samples(generated):
    """Megatron's StaticInferenceContext (keys before RoPE, whole-prefix ids each step) as the cache instead."""
    for name in ("greedy", "sampled"):
        for other, ours in zip(generated[f"{name}_megatron_cache"], generated[name]):
            for (tokens, logprobs, *rest), (tokens_ours, logprobs_ours, *rest_ours) in zip(other, ours):
                assert (tokens, rest) == (tokens_ours, rest_ours)
                assert logprobs == pytest.approx(logprobs_ours, abs=1e-5)


def test_megatron_core_attention_falls_back_to_the_static_context(generated):
    assert generated["fallback_cache"] == "megatron"
    assert generated["fallback_decode_path"] == "model forward: the megatron cache"
    for other, ours in zip(generated["greedy_megatron_attention"], generated["greedy"]):
        assert [s[0] for s in other] == [s[0] for s in ours]
        assert all(s[1] == pytest.approx(o[1], abs=1e-4) for s, o in zip(other, ours))


def test_greedy_logprobs_are_the_plain_softmax(generated):
    for samples, recomputed in zip(generated["greedy"], generated["greedy_recomputed"]):
        for (_, logprobs, _, _), expected in zip(samples, recomputed):
            assert logprobs == pytest.approx(expected, abs=1e-4)


def test_sampling_is_seeded_and_logprobs_are_under_the_used_distribution(generated):
    sampled = generated["sampled"]
    assert sampled == generated["sampled_again"]
    assert sampled != generated["sampled_other_seed"]
    assert len({tuple(s[0]) for s in sampled[2]}) > 1  # the three samples of a prompt are drawn apart
    for samples, recomputed in zip(sampled, generated["sampled_recomputed"]):
        for (tokens, logprobs, reason, _), expected in zip(samples, recomputed):
            assert len(tokens) == NEW and reason == "length"
            assert all(lp > float("-inf") for lp in expected)  # every token survived the filters
            assert logprobs == pytest.approx(expected, abs=1e-4)


def test_stop_token_ids(generated):
    stop = generated["stop_id"]
    for samples, greedy in zip(generated["stopped_by_id"], generated["greedy"]):
        full = greedy[0][0]
        for tokens, logprobs, reason, why in samples:
            if stop in full:
                cut = full.index(stop) + 1
                assert (tokens, reason, why) == (full[:cut], "stop", stop)  # the stop id is kept
                assert logprobs == greedy[0][1][:cut]
            else:
                assert (tokens, reason, why) == (full, "length", None)
    assert generated["stopped_by_id"][1][0][2] == "stop"  # prompt 1 emits it third


def test_stop_strings(generated):
    text = generated["stop_string"]
    for samples, greedy, decoded in zip(generated["stopped_by_string"], generated["greedy"], generated["decoded_greedy"]):
        full = greedy[0][0]
        ends = [k + 1 for k, prefix in enumerate(decoded[0]) if text in prefix]
        for tokens, _, reason, why in samples:
            if ends:  # stops at the first token whose text completes the string, and keeps it
                assert (tokens, reason, why) == (full[:ends[0]], "stop", text)
            else:
                assert (tokens, reason, why) == (full, "length", None)
    assert generated["stopped_by_string"][1][0][2] == "stop"


def test_prompt_rendering_matches_training_data():
    """The chat-rendered prompt is the training sample's prefix: same template, mode suffix and tokens."""
    from keye.data.chat import encode_conversation
    from keye.data.processor import Processor, ProcessorSettings
    from keye.data.sample import ImagePart, ImageRef, Message, TextPart
    from keye.generate.prompts import conversation_request

    tokenizer = tiny_tokenizer()
    processor = Processor(tokenizer, ProcessorSettings(image_min_tokens=4, image_max_tokens=16))
    media = {"a.png": png(84, 112, 1)}  # 112 x 84 pixels: 8 x 6 patches, 12 tokens
    user = Message("user", [ImagePart(ImageRef(path="a.png")), TextPart("how many red circle")])
    reply = Message("assistant", [TextPart("<think>two</think><answer>two</answer>")])
    for mode in ("think", "no_think", "auto", "agentic", None):
        request = conversation_request([user], processor, mode, media=media, n=4)
        training = encode_conversation([user, reply], tokenizer, [12], mode).input_ids
        prompt = request.prompt_ids.tolist()
        assert training[:len(prompt)] == prompt and len(training) > len(prompt)
        assert tokenizer.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")  # the open reply header
        assert request.images.grid_thw.tolist() == [[1, 8, 6]] and request.n == 4 and request.thinking_mode == mode
        assert request.position_ids.shape == (3, len(prompt))
    suffixed = tokenizer.decode(conversation_request([user], processor, "think", media=media).prompt_ids)
    assert "how many red circle/think<|im_end|>" in suffixed
