"""``KeyeVL.hf_generate``: Hugging Face ``generate`` on the released processor's tensors, on the tiny checkpoint.

The same three prompts as tests/generate/test_megatron_generator.py (an image, text only, a video and an
image; three lengths) go in as one left-padded batch with their vision packed row after row, as the released
processor makes them. Greedy ids must equal the released forward run as a no-cache greedy loop on the same
padded batch and the ``megatron`` generator's tokens on the requests; early stops are padded like
transformers; sampling is seeded and equals the generator's draw for the same request index.
"""

from __future__ import annotations

from pathlib import Path

from keye.testing.distributed import run_distributed
from test_megatron_generator import (NEW, SAMPLED, padded_batch, reference_greedy_padded, requests, tiny_tokenizer,
                                     write_checkpoint)


def _run(root: str) -> dict:
    from keye.data.tokenizer import SpecialTokens
    from keye.generate.contract import GeneratorContext, SamplingSettings
    from keye.hf import load_keye_vl
    from keye.plugins import get_registry

    tokenizer = tiny_tokenizer()
    write_checkpoint(Path(root) / "ckpt", tokenizer)
    keye = load_keye_vl(Path(root) / "ckpt")
    reqs = requests(tokenizer, SpecialTokens.from_tokenizer(tokenizer))
    for r in reqs:
        r.n = 1
    batch = padded_batch(reqs)
    length = batch["input_ids"].shape[1]
    Generator = get_registry().cls("generator", "megatron")
    generator = Generator(Generator.Config(), GeneratorContext(model=keye.model, tokenizer=tokenizer))
    out: dict = {"length": length, "input_ids": batch["input_ids"].tolist()}
    streamed: list[tuple[int, int]] = []
    greedy = keye.hf_generate(**batch, max_new_tokens=NEW, eos_token_id=[],
                              on_token=lambda row, token: streamed.append((row, token)))
    out["greedy"] = greedy.tolist()
    out["streamed"] = streamed
    out["reference"] = reference_greedy_padded(keye, reqs)
    out["generator"] = [o.samples[0].token_ids for o in
                        generator.generate(reqs, SamplingSettings(max_new_tokens=NEW, temperature=0.0))]
    stop = out["generator"][1][2]  # row 1 emits it third
    out["stop"] = stop
    out["stopped"] = keye.hf_generate(**batch, max_new_tokens=NEW, eos_token_id=stop, pad_token_id=5).tolist()
    out["sampled"] = keye.hf_generate(**batch, max_new_tokens=NEW, do_sample=True, seed=7, eos_token_id=[],
                                      **SAMPLED).tolist()
    out["sampled_generator"] = [o.samples[0].token_ids for o in
                                generator.generate(reqs, SamplingSettings(max_new_tokens=NEW, seed=7, **SAMPLED))]
    return out


def test_hf_generate_equals_the_no_cache_loop_and_the_generator(tmp_path):
    [out] = run_distributed(_run, 1, str(tmp_path))
    length = out["length"]
    greedy = out["greedy"]
    assert [row[:length] for row in greedy] == out["input_ids"]  # the padded prompt comes back as given
    assert [row[length:] for row in greedy] == out["reference"] == out["generator"]
    assert len(greedy[0]) == length + NEW
    # streamed as sampled: every row's tokens in order, step by step
    assert [[t for r, t in out["streamed"] if r == b] for b in range(3)] == out["reference"]
    assert [r for r, _ in out["streamed"][:3]] == [0, 1, 2]

    stop = out["stop"]  # transformers' early stop: the eos kept, the rest of the row padded
    for row, full in zip(out["stopped"], out["reference"]):
        new = row[length:]
        if stop in full:
            cut = full.index(stop) + 1
            assert new[:cut] == full[:cut] and set(new[cut:]) <= {5}
        else:
            assert new == full
    assert out["stopped"][1][length + 3:] == [5] * (len(out["stopped"][1]) - length - 3)

    assert [row[length:] for row in out["sampled"]] == out["sampled_generator"]
    assert out["sampled"] != greedy
