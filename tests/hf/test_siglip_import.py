"""Stage 0 continues SigLIP: a transformers ``SiglipModel`` checkpoint and SigLIP's tokenizer (issue 15).

Everything is made here, offline: a tiny random ``SiglipModel`` (every weight perturbed, so biases and norms
count) saved with ``save_pretrained``, and a tiny WordLevel tokenizer saved as a ``PreTrainedTokenizerFast``
directory that, like SigLIP's, ends every caption with ``</s>``. One spawned process (Megatron state is per
process) builds stage 0's model from the registry, loads the checkpoint with `keye.hf.siglip.load_siglip_into`,
tokenizes captions the way the contrastive stage does, and returns what the assertions compare:

- the step-0 image-text logits and loss equal transformers' ``SiglipModel(...).logits_per_image`` / its
  sigmoid loss (vision RoPE off, images of exactly ``image_size``, where SigLIP adds its table unchanged);
- the pooling head on a pack of images of different sizes equals transformers' head run on each image alone
  (float64: an independent formulation, padded attention per image vs keye's per-segment softmax);
- captions are padded to the text tower's length with ``</s>`` kept last; ids the table lacks are one line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from keye.testing.distributed import run_distributed

WORDS = "a red blue green yellow circle square triangle , on the left right of and two three small big".split()
CAPTIONS = ["a red circle", "two blue squares on the left of a big green triangle", "three small triangles"]
LENGTH = 8  # the text tower's max_position_embeddings: the second caption is truncated to it


def write_tokenizer(path: Path) -> Path:
    """A WordLevel tokenizer with SigLIP's habits: ``</s>`` appended, a pad token; saved for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))
    return path


def siglip_config() -> Any:
    from transformers import SiglipConfig

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, layer_norm_eps=1e-6)
    return SiglipConfig(
        text_config=dict(tower, vocab_size=len(WORDS) + 3, max_position_embeddings=LENGTH, projection_size=32),
        vision_config=dict(tower, image_size=56, patch_size=14),
    )


def write_siglip(path: Path) -> Path:
    from transformers import SiglipModel

    torch.manual_seed(0)
    model = SiglipModel(siglip_config()).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
        model.logit_scale.fill_(math.log(10.0) + 0.3)
        model.logit_bias.fill_(-2.5)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def _patchify(pixels: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """``[3, H, W]`` → ``[H/p * W/p, 3, p, p]`` in raster order (what the processor emits)."""
    c, height, width = pixels.shape
    grid = pixels.reshape(c, height // patch, patch, width // patch, patch)
    return grid.permute(1, 3, 0, 2, 4).reshape(-1, c, patch, patch)


@torch.no_grad()
def _rank(siglip_dir: str, tokenizer_dir: str) -> dict[str, Any]:
    from transformers import SiglipModel
    from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

    from keye.config.validate import validate_component
    from keye.data.processor import PairItem
    from keye.errors import KeyeUserError
    from keye.hf.files import read_config
    from keye.hf.siglip import load_siglip_into, tower_nodes
    from keye.model.composition import VisionInputs, build_component
    from keye.model.protocols import BuildContext
    from keye.parallel import init_parallel
    from keye.plugins import get_host
    from keye_plugins.stage.contrastive import ContrastiveModel, _batch

    parallel = init_parallel(tensor=1, pipeline=1, seed=5)
    registry = get_host().registry
    build = BuildContext(parallel, torch.float32, seed=5)
    nodes = tower_nodes(read_config(Path(siglip_dir)))
    nodes["vision_encoder"]["position_encoding"] = {"name": "none"}  # SigLIP has no RoPE
    nodes["text_encoder"]["tokenizer"] = tokenizer_dir

    def part(kind: str, node: dict) -> Any:
        return build_component(kind, validate_component(kind, node, kind, registry, str), registry, build)

    model = ContrastiveModel(part("vision_encoder", nodes["vision_encoder"]), part("text_encoder", nodes["text_encoder"]),
                             part("loss", {"name": "siglip_sigmoid"})).eval()
    load_siglip_into(model, siglip_dir)
    hf = SiglipModel.from_pretrained(siglip_dir, attn_implementation="eager").eval()
    result: dict[str, Any] = {"vision_head_built": model.vision_head is not None}

    # (1) step 0: stage 0's logits and loss are SigLIP's
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    items = [PairItem(f"pair{i}", VisionInputs(_patchify(pixels[i]), torch.tensor([[1, 4, 4]])),
                      torch.zeros(LENGTH, dtype=torch.long), caption) for i, caption in enumerate(CAPTIONS)]
    images, ids = _batch(items, model.caption_ids)  # as the stage's forward step makes them
    tok = model.text_encoder.tokenizer
    reference_ids = tok(CAPTIONS, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt").input_ids
    expected = hf(input_ids=reference_ids, pixel_values=pixels, return_loss=True)
    image_emb = torch.nn.functional.normalize(model.embed_images(images), dim=-1)
    text_emb = torch.nn.functional.normalize(model.text_encoder(ids), dim=-1)
    logits = model.loss.logit_scale.exp() * image_emb @ text_emb.t() + model.loss.logit_bias
    loss_sum, count = model(images, ids)
    result.update(ids=ids.tolist(), reference_ids=reference_ids.tolist(), eos=tok.eos_token_id, pad=tok.pad_token_id,
                  logits=logits, hf_logits=expected.logits_per_image, loss=float(loss_sum / count),
                  hf_loss=float(expected.loss))

    # (2) the pooling head on a pack of images of three sizes vs transformers' head on each alone, in float64
    grids = [(1, 3, 5), (1, 4, 4), (2, 2, 3)]
    counts = [t * h * w for t, h, w in grids]
    features = torch.randn(sum(counts), 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    head = model.vision_encoder.head.double()
    reference = SiglipMultiheadAttentionPoolingHead(hf.config.vision_config).double().eval()
    reference.load_state_dict(hf.vision_model.head.state_dict())
    result["packed_head"] = head(features, torch.tensor(grids))
    result["head_alone"] = torch.cat([reference(chunk[None]) for chunk in features.split(counts)])

    # (3) ids the text tower's table lacks: one line naming the key and the sample (the LLM tokenizer's ids)
    items[1].caption_ids = torch.tensor([3, 4, 151645] + [0] * (LENGTH - 3))
    model.text_encoder.tokenizer = None  # captions from the processor's (blueprint) tokenizer
    try:
        model.caption_ids(items)
    except KeyeUserError as exc:
        result["out_of_range"] = str(exc)
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("siglip")
    siglip, tokenizer = write_siglip(root / "siglip"), write_tokenizer(root / "tokenizer")
    return run_distributed(_rank, 1, str(siglip), str(tokenizer), timeout=300)[0]


def test_step0_logits_equal_transformers_siglip(ranks: dict[str, Any]) -> None:
    assert not ranks["vision_head_built"]  # the image embedding is SigLIP's pooling head, not a new Linear
    torch.testing.assert_close(ranks["logits"], ranks["hf_logits"], atol=2e-5, rtol=1e-5)
    assert ranks["hf_logits"].std() > 0.1  # distinct pairs, not a constant
    assert ranks["loss"] == pytest.approx(ranks["hf_loss"], rel=1e-5)


def test_pooling_head_on_a_pack_equals_each_image_alone(ranks: dict[str, Any]) -> None:
    torch.testing.assert_close(ranks["packed_head"], ranks["head_alone"], atol=1e-12, rtol=1e-12)


def test_captions_use_the_text_towers_tokenizer_padded_to_its_length(ranks: dict[str, Any]) -> None:
    ids, eos, pad = ranks["ids"], ranks["eos"], ranks["pad"]
    assert ids == ranks["reference_ids"]
    assert [len(row) for row in ids] == [LENGTH] * 3
    assert ids[0] == [3 + WORDS.index(w) for w in ("a", "red", "circle")] + [eos] + [pad] * (LENGTH - 4)
    assert ids[1][-1] == eos and pad not in ids[1]  # truncated to the tower's length, end-of-text kept


def test_a_caption_id_outside_the_table_names_the_key(ranks: dict[str, Any]) -> None:
    message = ranks["out_of_range"]
    assert "\n" not in message
    assert message.startswith("model.text_encoder.tokenizer: the caption of sample 'pair1' has token id 151645")
    assert f"has {len(WORDS) + 3} rows" in message


def test_tokenizer_larger_than_the_table_is_one_line(tmp_path: Path) -> None:
    from keye.errors import KeyeUserError
    from keye_plugins.text_encoder.siglip_text import load_caption_tokenizer

    path = write_tokenizer(tmp_path / "tok")
    with pytest.raises(KeyeUserError, match=rf"^model.text_encoder.tokenizer: '.*' has {len(WORDS) + 3} tokens, "
                                            r"but model.text_encoder.vocab_size is 8$"):
        load_caption_tokenizer(str(path), vocab_size=8)
    with pytest.raises(KeyeUserError, match=r"^model.text_encoder.tokenizer: cannot load a tokenizer from"):
        load_caption_tokenizer(str(tmp_path / "nothing"), vocab_size=8)


def test_blueprint_tokenizer_too_large_for_the_table_stops_before_step_one(tmp_path: Path) -> None:
    """No tower tokenizer: captions would use model.tokenizer; a tokenizer larger than the table is refused."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from keye.errors import KeyeUserError
    from keye_plugins.stage.contrastive import check_caption_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(write_tokenizer(tmp_path / "tok")), local_files_only=True)
    check_caption_tokenizer(SimpleNamespace(tokenizer=None, vocab_size=len(tokenizer)), tokenizer)  # fits: fine
    with pytest.raises(KeyeUserError, match=rf"^model.text_encoder.tokenizer is not set, so captions use "
                                            rf"model.tokenizer \({len(tokenizer)} tokens\), but the text tower's "
                                            r"table has 8 rows"):
        check_caption_tokenizer(SimpleNamespace(tokenizer=None, vocab_size=8), tokenizer)


def test_a_sentencepiece_tokenizer_without_sentencepiece_is_one_line(tmp_path: Path) -> None:
    """google/siglip-so400m's tokenizer is a SentencePiece model: without the package, one line saying what to install."""
    import importlib.util

    from keye.errors import KeyeUserError
    from keye_plugins.text_encoder.siglip_text import load_caption_tokenizer

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed here: the message for its absence cannot show")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "SiglipTokenizer", "model_max_length": 64}')
    (tmp_path / "spiece.model").write_bytes(b"\0" * 16)
    with pytest.raises(KeyeUserError, match=r"^model.text_encoder.tokenizer: '.*' needs the sentencepiece and "
                                            r"protobuf packages .*: pip install 'keye\[siglip\]'$"):
        load_caption_tokenizer(str(tmp_path), vocab_size=32000)
