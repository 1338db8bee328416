"""The model an evaluation (or a chat) samples from: a generator, the processor that renders prompts, settings.

Two sources, one object (`EvalModel`):

- `from_released`: a released-format folder (config.json, safetensors and the tokenizer, as
  ``keye-launch export`` writes it), loaded with `keye.hf.load_keye_vl`;
- `from_stage`: a finished stage of a run: the blueprint builds the model in this process's layout and the
  stage's Megatron-Core checkpoint (any layout) is loaded into it, as ``keye-launch export`` does; the
  tokenizer and the image/video budgets are the blueprint's (`keye.data.pipeline.build_processor`).

Prompts are rendered by the training chat code (`keye.generate.prompts.conversation_request`) in the
requested thinking mode; generation is greedy by default and stops at ``<|im_end|>`` / ``<|endoftext|>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

from keye.errors import KeyeUserError

#: the thinking modes a user may ask for (`keye.data.chat.MODE_SUFFIXES`)
MODES = ("think", "no_think", "auto", "agentic")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise KeyeUserError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    return mode


@dataclass
class EvalModel:
    generator: Any
    processor: Any
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = 0

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def request(self, messages: Sequence[Any], mode: str, media: Mapping[str, bytes], key: str) -> Any:
        from keye.generate.prompts import conversation_request

        request = conversation_request(messages, self.processor, mode, media=media, key=key)
        model = getattr(self.generator, "model", None)
        window = getattr(getattr(getattr(model, "language_model", None), "config", None), "max_position_embeddings", None)
        length = request.prompt_ids.numel()
        if window is not None and length + self.max_new_tokens > window:
            raise KeyeUserError(f"sample '{key}': prompt of {length} tokens + max_new_tokens {self.max_new_tokens} "
                                f"exceeds the model's window of {window} positions")
        return request

    def settings(self) -> Any:
        from keye.generate.contract import SamplingSettings

        special = self.processor.special
        return SamplingSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=self.seed,
                                stop_token_ids=(special.eos, special.pad))  # <|im_end|>, <|endoftext|>

    def generate(self, requests: Sequence[Any],
                 on_token: Callable[[int, int, int], None] | None = None) -> list[tuple[str, int]]:
        """The reply text of each request (its first sample) and its length in tokens."""
        outputs = self.generator.generate(list(requests), self.settings(), on_token=on_token)
        return [(self.decode(o.samples[0].token_ids), len(o.samples[0].token_ids)) for o in outputs]

    def decode(self, ids: Sequence[int]) -> str:
        from keye.eval.extract import clean

        return clean(self.tokenizer.decode(list(ids), skip_special_tokens=False))


def make_generator(model: Any, tokenizer: Any, parallel: Any = None) -> Any:
    from keye.generate.contract import GeneratorContext
    from keye.plugins import get_registry

    Generator = get_registry().cls("generator", "megatron")
    return Generator(Generator.Config(), GeneratorContext(model=model, tokenizer=tokenizer, parallel=parallel))


def from_released(path: str | Path, **settings: Any) -> EvalModel:
    from transformers import AutoTokenizer

    from keye.data.processor import Processor, ProcessorSettings
    from keye.hf import load_keye_vl
    from keye.plugins import get_registry

    from keye.parallel import init_parallel
    from transformers.utils import logging as hf_logging

    init_parallel()  # one process; before Megatron is imported, so its CPU fallback notices stay quiet
    keye = load_keye_vl(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer reads config.json and warns that "Keye" is no model it knows
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise KeyeUserError(f"{path}: no tokenizer beside the weights ({str(exc).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    decoder = get_registry().cls("video_decoder", "pyav")  # through the registry: the core imports no plugin
    processor = Processor(tokenizer, ProcessorSettings(), decoder(decoder.Config()), keye.configs.position_encoding())
    return EvalModel(make_generator(keye.model, tokenizer), processor, **settings)


def stage_model(blueprint: Any, folder: Path, registry: Any, parallel: Any) -> Any:
    """The blueprint's model in this process's layout with the weights of the finished stage in ``folder``
    (``run.output_dir/<stage>``; written in any layout): this pipeline stage's part, and under an interleaved
    pipeline the list of this rank's chunks (`keye.model.pipeline_split.virtual_stages`), which the
    ``megatron`` generator takes as its model."""
    from keye.data.pipeline import load_tokenizer, vocab_size
    from keye.data.tokenizer import SpecialTokens
    from keye.model.composition import KeyeVLModel
    from keye.model.pipeline_split import virtual_stages
    from keye.model.protocols import DTYPES, BuildContext
    from keye.parallel.dist_checkpoint import is_checkpoint
    from keye.train.stage_weights import load_weights_from, weights_folder

    if not is_checkpoint(weights_folder(folder)):
        raise KeyeUserError(f"{folder}: stage '{Path(folder).name}' has no weights yet (run it first)")
    tokenizer = load_tokenizer(blueprint.model.tokenizer, vocab_size(blueprint.model))
    special = SpecialTokens.from_tokenizer(tokenizer)
    chunks = [KeyeVLModel(blueprint.model, registry,
                          BuildContext(parallel, DTYPES[blueprint.precision.dtype], pre, post, vp_stage=vp,
                                       seed=blueprint.run.seed),
                          image_token_id=special.image_pad, video_token_id=special.video_pad).eval()
              for vp, pre, post in virtual_stages(parallel)]
    load_weights_from(chunks, folder)
    return chunks[0] if len(chunks) == 1 else chunks


def from_stage(blueprint: Any, stage_name: str, registry: Any, parallel: Any, data_stage: Any = None,
               **settings: Any) -> EvalModel:
    """``data_stage``: the blueprint stage whose ``data`` section gives the image/video budgets (default: the
    evaluated stage's)."""
    from keye.data.pipeline import build_processor

    names = [stage.name for stage in blueprint.stages]
    if stage_name not in names:
        raise KeyeUserError(f"no stage named '{stage_name}'; stages: {', '.join(names) or '(none)'}")
    model = stage_model(blueprint, Path(blueprint.run.output_dir) / stage_name, registry, parallel)
    data_stage = data_stage if data_stage is not None else blueprint.stages[names.index(stage_name)]
    processor = build_processor(SimpleNamespace(blueprint=blueprint, stage=data_stage, registry=registry))
    return EvalModel(make_generator(model, processor.tokenizer, parallel), processor, **settings)


def is_blueprint(source: str) -> bool:
    return Path(source).suffix in (".yaml", ".yml")


def load_source(source: str, stage: str | None = None, overrides: Sequence[str] = (), **settings: Any) -> EvalModel:
    """The model of a command-line SOURCE: a released-format folder, or a blueprint file and one of its
    finished stages (built in one process, as ``keye-launch export`` does)."""
    path = Path(source)
    if is_blueprint(source):
        from keye.config import load_blueprint
        from keye.model.backend import use_blueprint_impl
        from keye.parallel import init_parallel
        from keye.plugins import get_host

        if not path.is_file():
            raise KeyeUserError(f"{source}: no such blueprint file")
        if stage is None:
            raise KeyeUserError(f"{source}: a blueprint source needs the stage to load (SOURCE STAGE)")
        host = get_host()
        cfg = load_blueprint(source, overrides, host.registry)
        use_blueprint_impl(cfg)
        return from_stage(cfg, stage, host.registry, init_parallel(seed=cfg.run.seed), **settings)
    if not path.is_dir():
        raise KeyeUserError(f"{source}: not a released-format folder nor a blueprint file (.yaml)")
    return from_released(path, **settings)
