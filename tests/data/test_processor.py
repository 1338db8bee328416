"""The processor: conversation → ids, next-token labels, M-RoPE ids and vision inputs; bad media → SampleError."""

import io

import pytest
import torch
from PIL import Image

from keye.data.batch import IGNORE, collate_pack
from keye.data.processor import Processor, ProcessorSettings, SampleError
from keye.data.sample import Sample
from keye.data.tokenizer import SpecialTokens, build_tiny_tokenizer
from keye_plugins.position_encoding.mrope_time_aligned import MRopeTimeAligned, get_rope_index


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(["a red circle on the left", "how many squares are there? two"] * 20, vocab_size=512)


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def conversation(key: str = "s1") -> Sample:
    return Sample.from_dict({
        "kind": "conversation", "key": key,
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": {"key": "img.png"}}, {"type": "text", "text": "what colour?"}]},
            {"role": "assistant", "content": "red"},
        ],
    })


def test_conversation_with_an_image(tokenizer):
    processor = Processor(tokenizer, ProcessorSettings())
    item = processor(conversation(), {"img.png": png(56, 84)})
    special = SpecialTokens.from_tokenizer(tokenizer)
    grid = item.images.grid_thw
    assert grid.tolist() == [[1, 6, 4]]  # 84×56 px → 6×4 patches of 14 px
    assert int((item.input_ids == special.image_pad).sum()) == 6 * 4 // 4
    trained = item.labels != IGNORE
    # Next-token labels: where a label counts it is the following input id.
    assert torch.equal(item.labels[:-1][trained[:-1]], item.input_ids[1:][trained[:-1]])
    assert tokenizer.decode(item.labels[trained]) == "red<|im_end|>"
    assert torch.equal(item.answer_mask, trained)
    # M-RoPE ids equal the batch formulation on the sample alone.
    config = MRopeTimeAligned.Config(image_token_id=special.image_pad, video_token_id=special.video_pad)
    expected, _ = get_rope_index(item.input_ids[None], grid, None, None, None, config)
    assert torch.equal(item.position_ids, expected[:, 0])


def test_packing_two_processed_samples(tokenizer):
    processor = Processor(tokenizer, ProcessorSettings())
    a = processor(conversation("a"), {"img.png": png(56, 56)})
    b = processor(conversation("b"), {"img.png": png(84, 84)})
    batch = collate_pack([a, b], seq_len=len(a) + len(b) + 5, pad_id=0)
    assert batch.images.patches.shape[0] == 16 + 36  # 4×4 and 6×6 patches, in order
    assert batch.images.grid_thw.tolist() == [[1, 4, 4], [1, 6, 6]]
    mask = batch.attention_mask.dense()  # (1, 1, T, T), True = masked
    assert mask.shape == (1, 1, len(a) + len(b) + 5, len(a) + len(b) + 5)
    assert bool(mask[0, 0, len(a), 0])  # b's first token cannot see a's (True = masked)
    assert bool(mask[0, 0, len(a), len(a) - 1])
    assert not bool(mask[0, 0, len(a) + 1, len(a)])  # ... but its own earlier tokens
    assert torch.equal(batch.position_ids[:, 0, len(a):len(a) + len(b)], b.position_ids)
    assert batch.loss_mask.sum() == (a.labels != IGNORE).sum() + (b.labels != IGNORE).sum()
    assert len(batch.answer_segments) == 2


@pytest.mark.parametrize(
    "media, kind",
    [({"img.png": b"not a png"}, "corrupt_image"), ({}, "missing_media"), ({"img.png": png(28, 28 * 300)}, "over_budget")],
)
def test_bad_media_is_a_sample_error_with_its_kind(tokenizer, media, kind):
    with pytest.raises(SampleError) as info:
        Processor(tokenizer, ProcessorSettings())(conversation(), media)
    assert info.value.kind == kind and info.value.key == "s1"
    assert str(info.value).startswith(f"sample 's1': {kind}: ")
