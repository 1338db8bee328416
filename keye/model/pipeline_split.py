"""How many LLM layers the first pipeline stage should hold, given that it also runs the vision side.

The first pipeline stage embeds tokens *and* runs the vision encoder and projector, so an even split of
the LLM layers makes it the slowest stage and every other stage waits for it. Forward FLOPs per LLM token
are about ``2 × parameters`` per layer; the ViT runs on ``merge²`` patches per vision token, so per LLM token
it costs about ``2 × vit_params × merge² × vision_share``. Expressed in LLM layers, that is the number of
layers to take off the first stage; the rest are spread evenly over the others (Megatron-Core's
``num_layers_in_first_pipeline_stage``: the remaining layers must divide by the remaining stages).

With an interleaved pipeline (``parallel.virtual_pipeline``) each rank holds several model chunks, one
per virtual stage; `virtual_stages` says which, and which of them holds the input embedding / output head.
"""

from __future__ import annotations


def vision_cost_in_layers(vision_params: int, projector_params: int, llm_layer_params: int,
                          vision_share: float = 0.5, merge: int = 2) -> float:
    """The vision side's cost per LLM token, in units of one LLM layer."""
    per_vision_token = vision_params * merge**2 + projector_params
    return vision_share * per_vision_token / llm_layer_params


def first_stage_layers(num_layers: int, pipeline: int, vision_layers: float) -> int | None:
    """Layers for the first stage so that (its layers + ``vision_layers``) ≈ every other stage's layers.

    Returns None when an even split is already the best (no vision, one stage, or no valid uneven split).
    The remaining ``num_layers - first`` must divide by ``pipeline - 1``; among those splits the one with
    the smallest slowest stage wins, ties going to more layers on the first stage.
    """
    if pipeline < 2 or vision_layers <= 0:
        return None
    best, best_cost = None, num_layers / pipeline + vision_layers  # the even split
    for first in range(num_layers - pipeline + 2):
        rest = num_layers - first
        if rest % (pipeline - 1):
            continue
        slowest = max(first + vision_layers, rest / (pipeline - 1))
        if slowest < best_cost or (slowest == best_cost and best is not None and first > best):
            best, best_cost = first, slowest
    return best


def virtual_stages(parallel) -> list[tuple[int | None, bool, bool]]:
    """``(vp_stage, pre_process, post_process)`` for each model chunk this rank builds, in schedule order.

    Without a virtual pipeline: one chunk, ``vp_stage`` None, holding the embedding on the first pipeline
    stage and the output head on the last. With ``vpp_size`` V: V chunks; only chunk 0 of the first stage
    embeds and only chunk V-1 of the last stage has the head (Megatron's ``is_pipeline_first_stage`` with
    ``ignore_virtual=False``), because layers run stage 0 chunk 0, stage 1 chunk 0, ..., stage 0 chunk 1, ...
    """
    if parallel is None or not parallel.vpp_size:
        first = parallel is None or parallel.is_first_stage
        last = parallel is None or parallel.is_last_stage
        return [(None, first, last)]
    chunks = parallel.vpp_size
    return [(vp, parallel.is_first_stage and vp == 0, parallel.is_last_stage and vp == chunks - 1)
            for vp in range(chunks)]
