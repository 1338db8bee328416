"""Generation and the weight stream in every parallel layout: TP=2, PP=2 and TP=2 x PP=2 against one process,
in real gloo processes (one run per layout does both, as starting Megatron processes is the cost here).

One process writes the tiny released-format checkpoint of ``test_megatron_generator``; each layout loads it
(each rank its TP slice and its PP stage's layers). Then:

- **generation** (the ``megatron`` generator, each of its two KV caches: keye's and Megatron's static
  context): the three prompts of ``test_megatron_generator`` (an image, text only, a video and an image;
  n = 1, 2, 3), greedy and sampled with a seed. Every rank must return the one-process tokens and finish
  reasons, and log-probabilities within float rounding (TP splits the matmuls: the last bits differ). With
  keye's cache, PP stages decode through ``keye.generate.lean_decode`` and TP ranks through the model's
  forward, so both decode paths are held to the one-process tokens.
- **the weight stream** (``keye.generate.weight_stream.hf_weight_stream``): on every rank, each released
  tensor the model uses exactly once, bit for bit the checkpoint's, in the same order on all ranks. In one
  process, the per-tensor mapping equals the whole-state one (``keye_to_hf_state``), and the stream written
  out beside the checkpoint's config.json loads (``load_keye_vl``) into a fresh model with the same parameters.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from keye.testing.distributed import run_distributed
from test_megatron_generator import NEW, SAMPLED, requests, tiny_tokenizer, write_checkpoint

CACHES = ("keye", "megatron")  # keye's KV cache and Megatron's StaticInferenceContext


def _run(root: str, tensor: int, pipeline: int) -> dict:
    from keye.data.tokenizer import SpecialTokens
    from keye.generate.contract import GeneratorContext, SamplingSettings
    from keye.generate.weight_stream import hf_weight_stream
    from keye.hf import load_keye_vl
    from keye.parallel import init_parallel
    from keye.plugins import get_registry

    parallel = init_parallel(tensor=tensor, pipeline=pipeline)
    tokenizer = tiny_tokenizer()
    checkpoint = Path(root) / "ckpt"
    if tensor * pipeline == 1:
        write_checkpoint(checkpoint, tokenizer)
    keye = load_keye_vl(checkpoint)
    Generator = get_registry().cls("generator", "megatron")
    reqs = requests(tokenizer, SpecialTokens.from_tokenizer(tokenizer))
    out: dict = {"stream": list(hf_weight_stream(keye))}
    for cache in CACHES:
        generator = Generator(Generator.Config(kv_cache=cache),
                              GeneratorContext(model=keye.model, tokenizer=tokenizer, parallel=parallel))
        out[cache, "decode_path"] = generator.decode_path()
        for name, settings in (("greedy", SamplingSettings(max_new_tokens=NEW, temperature=0.0)),
                               ("sampled", SamplingSettings(max_new_tokens=NEW, seed=3, **SAMPLED))):
            outputs = generator.generate(reqs, settings)
            out[cache, name] = [[(s.token_ids, s.logprobs, s.finish_reason) for s in o.samples] for o in outputs]
    if tensor * pipeline == 1:
        out.update(_one_process_stream_checks(keye, checkpoint, out["stream"], Path(root) / "fresh"))
    return out


def _one_process_stream_checks(keye, checkpoint: Path, stream: list, fresh: Path) -> dict:
    from keye.generate.weight_stream import hf_tensors
    from keye.hf import load_keye_vl
    from keye.hf.files import read_weights, write_weights
    from keye.hf.weights import gather_full_state, keye_to_hf_state

    state = gather_full_state(keye.model)
    out = {
        "per_tensor": {n: t for name, full in state.items() for n, t in hf_tensors(name, full, keye.configs)},
        "whole_state": keye_to_hf_state(state, keye.configs),
        "checkpoint": {k: v for k, v in read_weights(checkpoint).items() if k not in keye.unused},
    }
    fresh.mkdir()
    shutil.copy(checkpoint / "config.json", fresh / "config.json")
    write_weights({**dict(stream), **keye.unused}, fresh)
    mine, theirs = dict(keye.model.named_parameters()), dict(load_keye_vl(fresh).model.named_parameters())
    out["fresh_params_equal"] = set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("layouts"))
    [result] = run_distributed(_run, 1, root, 1, 1)
    return root, result


def _check_stream(stream: list, checkpoint: dict) -> None:
    names = [name for name, _ in stream]
    assert len(names) == len(set(names)) and set(names) == set(checkpoint)  # each used tensor, once
    for name, tensor in stream:
        assert tensor.dtype == checkpoint[name].dtype and torch.equal(tensor, checkpoint[name]), name


def test_one_process_stream_is_the_checkpoint_and_loads_into_a_fresh_model(one_process):
    _, result = one_process
    _check_stream(result["stream"], result["checkpoint"])
    assert result["fresh_params_equal"]
    per_tensor, whole = result["per_tensor"], result["whole_state"]
    assert set(per_tensor) == set(whole) and all(torch.equal(per_tensor[k], whole[k]) for k in whole)


def test_one_process_caches_agree(one_process):
    _, result = one_process
    for name in ("greedy", "sampled"):
        for other, ours in zip(result["megatron", name], result["keye", name]):
            assert [s[0] for s in other] == [s[0] for s in ours]


@pytest.mark.parametrize("tensor, pipeline", [(2, 1), (1, 2), (2, 2)])
def test_layout_generates_and_streams_as_one_process(one_process, tensor, pipeline):
    root, expected = one_process
    ranks = run_distributed(_run, tensor * pipeline, root, tensor, pipeline)
    for rank, got in enumerate(ranks):
        # keye's cache decodes lean on each pipeline stage; TP ranks run the model's forward (keye.generate.lean_decode)
        assert got["keye", "decode_path"] == ("lean" if tensor == 1 else "model forward: tensor parallel")
        assert got["megatron", "decode_path"] == "model forward: the megatron cache"
        _check_stream(got["stream"], expected["checkpoint"])
        assert [name for name, _ in got["stream"]] == [name for name, _ in ranks[0]["stream"]]  # in step
        for cache in CACHES:  # every cache against the one-process default (keye's)
            for name in ("greedy", "sampled"):
                for samples, samples_1 in zip(got[cache, name], expected["keye", name]):
                    assert len(samples) == len(samples_1)
                    for (tokens, logprobs, reason), (tokens_1, logprobs_1, reason_1) in zip(samples, samples_1):
                        assert (tokens, reason) == (tokens_1, reason_1), (rank, cache, name)
                        assert logprobs == pytest.approx(logprobs_1, abs=1e-4), (rank, cache, name)
