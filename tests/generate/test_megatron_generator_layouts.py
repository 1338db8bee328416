"""The ``megatron`` generator gives the same tokens in every parallel layout: TP=2, PP=2 and TP=2 x PP=2
against one process, in real gloo processes.

One process writes the tiny released-format checkpoint of ``test_megatron_generator`` and generates from
it; each layout loads the same checkpoint (each rank its TP slice and its PP stage's layers) and generates
from the same three prompts (an image, text only, a video and an image; n = 1, 2, 3), greedy and sampled
with a seed, with each of the two KV caches (keye's, Megatron's static context). Every rank of every layout must return the one-process tokens and finish reasons, and
log-probabilities within float rounding (TP splits the matmuls, so logits differ in the last bits).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from keye.testing.distributed import run_distributed
from test_megatron_generator import NEW, SAMPLED, requests, tiny_tokenizer, write_checkpoint

CACHES = ("keye", "megatron")  # keye's KV cache and Megatron's StaticInferenceContext


def _generate(root: str, tensor: int, pipeline: int) -> dict:
    from keye.data.tokenizer import SpecialTokens
    from keye.generate.contract import GeneratorContext, SamplingSettings
    from keye.hf import load_keye_vl
    from keye.parallel import init_parallel
    from keye.plugins import get_registry

    parallel = init_parallel(tensor=tensor, pipeline=pipeline)
    tokenizer = tiny_tokenizer()
    checkpoint = Path(root) / "ckpt"
    if tensor * pipeline == 1:
        write_checkpoint(checkpoint, tokenizer)
    model = load_keye_vl(checkpoint).model
    Generator = get_registry().cls("generator", "megatron")
    reqs = requests(tokenizer, SpecialTokens.from_tokenizer(tokenizer))
    out = {}
    for cache in CACHES:
        generator = Generator(Generator.Config(kv_cache=cache),
                              GeneratorContext(model=model, tokenizer=tokenizer, parallel=parallel))
        for name, settings in (("greedy", SamplingSettings(max_new_tokens=NEW, temperature=0.0)),
                               ("sampled", SamplingSettings(max_new_tokens=NEW, seed=3, **SAMPLED))):
            outputs = generator.generate(reqs, settings)
            out[cache, name] = [[(s.token_ids, s.logprobs, s.finish_reason) for s in o.samples] for o in outputs]
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("layouts"))
    [result] = run_distributed(_generate, 1, root, 1, 1)
    return root, result


@pytest.mark.parametrize("tensor, pipeline", [(2, 1), (1, 2), (2, 2)])
def test_layout_generates_the_one_process_tokens(one_process, tensor, pipeline):
    root, expected = one_process
    ranks = run_distributed(_generate, tensor * pipeline, root, tensor, pipeline)
    for rank, got in enumerate(ranks):
        for cache, name in got:  # every cache against the one-process default (keye's)
            for samples, samples_expected in zip(got[cache, name], expected["keye", name]):
                assert len(samples) == len(samples_expected)
                for (tokens, logprobs, reason), (tokens_1, logprobs_1, reason_1) in zip(samples, samples_expected):
                    assert (tokens, reason) == (tokens_1, reason_1), (rank, cache, name)
                    assert logprobs == pytest.approx(logprobs_1, abs=1e-4), (rank, cache, name)
