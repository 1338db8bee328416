"""Generation: sampling from the model being trained (RL rollouts, CoT building, rejection sampling, chat, eval).

- `keye.generate.contract`: the ``generator`` kind's contract: `GenerationRequest` and `SamplingSettings` in,
  one `GenerationOutput` per request out (ids, log-probs under the distribution sampled from, finish reason),
  and the `Generator` Protocol (``generate``, ``sync_weights``).
- `keye.generate.sampling`: temperature, top-k, top-p, min-p and the seeded draw, as pure functions.
- `keye.generate.prompts`: a request from a conversation, rendered by the training chat code in a thinking mode.
- `keye.generate.kv_cache`: keye's KV cache (keys after RoPE) for the built-in ``megatron`` generator
  (``keye_plugins.generator.megatron``).
- `keye.generate.weight_stream`: the weights as (released name, full tensor) pairs from any TP/PP layout,
  for engines outside the training process.

Use::

    from keye.generate.contract import GeneratorContext, SamplingSettings
    from keye.plugins import get_registry

    Generator = get_registry().cls("generator", "megatron")
    generator = Generator(Generator.Config(), GeneratorContext(model=model, tokenizer=tokenizer))
    outputs = generator.generate(requests, SamplingSettings(temperature=0.6, top_k=20, top_p=0.95, seed=0,
                                                            stop_token_ids=(im_end, endoftext)))
"""
