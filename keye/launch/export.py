"""``keye-launch export``: a finished stage of a run → the released Keye-VL Hugging Face format.

The blueprint says what the model is; the stage folder holds its weights as a Megatron-Core distributed
checkpoint, whatever layout trained it. The export builds the model in one process, loads the weights
whole, writes config.json + safetensors with `keye.hf.save_keye_vl`, and saves the tokenizer beside
them, so the folder loads with `keye.hf.load_keye_vl` (and with the released code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from keye.errors import KeyeUserError


def export_stage(blueprint: str, stage: str, destination: str, overrides: Sequence[str] = ()) -> Path:
    from keye.config import load_blueprint
    from keye.data.pipeline import load_tokenizer, vocab_size
    from keye.data.tokenizer import SpecialTokens
    from keye.hf import save_keye_vl
    from keye.model.backend import use_blueprint_impl
    from keye.model.composition import KeyeVLModel
    from keye.model.protocols import DTYPES, BuildContext
    from keye.parallel import init_parallel
    from keye.plugins import get_host
    from keye.parallel.dist_checkpoint import is_checkpoint
    from keye.train.stage_weights import load_weights_from, weights_folder

    host = get_host()
    cfg = load_blueprint(blueprint, overrides, host.registry)
    names = [s.name for s in cfg.stages]
    if stage not in names:
        raise KeyeUserError(f"{blueprint}: no stage named '{stage}'; stages: {', '.join(names) or '(none)'}")
    folder = Path(cfg.run.output_dir) / stage
    if not is_checkpoint(weights_folder(folder)):
        raise KeyeUserError(f"{folder}: stage '{stage}' has no weights yet (run it first)")
    use_blueprint_impl(cfg)
    parallel = init_parallel(seed=cfg.run.seed)
    tokenizer = load_tokenizer(cfg.model.tokenizer, vocab_size(cfg.model))
    special = SpecialTokens.from_tokenizer(tokenizer)
    model = KeyeVLModel(cfg.model, host.registry, BuildContext(parallel, DTYPES[cfg.precision.dtype], seed=cfg.run.seed),
                        image_token_id=special.image_pad, video_token_id=special.video_pad)
    load_weights_from(model, folder)
    token_ids = {"vision_start_token_id": special.vision_start, "vision_end_token_id": special.vision_end,
                 "image_token_id": special.image_pad, "video_token_id": special.video_pad,
                 "eos_token_id": special.eos, "pad_token_id": special.pad}
    out = save_keye_vl(model, destination, extra_config=token_ids)
    tokenizer.save_pretrained(str(destination))
    return out
