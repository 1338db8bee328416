"""The synthetic world: deterministic, schema-valid, and its answers are what the pixels show."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import re
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keye.data.sample import ConversationSample, PairSample, PreferenceSample, RLPromptSample, Sample
from keye.data.sources import check_image, check_video, media_name, media_refs
from keye.data.synthetic import RL_REWARDS, TASKS, expand_tasks, generate, generate_many
from keye.data.synthetic_images import BACKGROUND, COLORS, in_split
from keye.data.synthetic_video import VIDEO_FPS, event_times
from keye.data.video import sample_frame_indices

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("make_synthetic_data", ROOT / "tools" / "make_synthetic_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _by_task(task: str, n: int, split: str = "train"):
    return list(generate_many(n, tasks=[task], split=split))


def _question(item) -> str:
    sample = item.sample
    messages = sample.prompt if isinstance(sample, PreferenceSample) else sample.messages
    return messages[0].text


def _reply(item) -> str:
    return item.sample.messages[-1].text


def _pixels(item) -> np.ndarray:
    (data,) = item.media.values()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def _components(mask: np.ndarray) -> int:
    """Connected regions of a boolean mask (4-neighbourhood), by breadth-first search."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        seen[start] = True
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


def _sampled_frames(item) -> tuple[np.ndarray, float]:
    """The frames the decoder feeds the model (decord, default 2 fps sampling) and their sampling rate."""
    decord = pytest.importorskip("decord")
    (data,) = item.media.values()
    reader = decord.VideoReader(io.BytesIO(data))
    indices = sample_frame_indices(len(reader), reader.get_avg_fps())
    frames = reader.get_batch(indices.tolist()).asnumpy().astype(int)
    return frames, len(indices) / len(reader) * reader.get_avg_fps()


# --- determinism, schema, splits ------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_samples():
    tasks = ["count", "video_when", "ocr"]
    first = [generate(i, tasks=tasks, seed=3) for i in range(6)]
    again = [generate(i, tasks=tasks, seed=3) for i in range(6)]
    other = [generate(i, tasks=tasks, seed=4) for i in range(6)]
    assert [(a.sample.to_json(), a.media) for a in first] == [(b.sample.to_json(), b.media) for b in again]
    assert [a.media for a in first] != [c.media for c in other]


def test_every_task_makes_a_valid_sample_with_its_media():
    kinds = {"pair": PairSample, "preference": PreferenceSample, "rl": RLPromptSample}
    for item in generate_many(2 * len(TASKS)):
        sample = item.sample
        assert isinstance(sample, kinds.get(sample.meta["task"], ConversationSample))
        raw = sample.to_dict()
        assert Sample.from_dict(raw).to_dict() == raw  # passes the strict schema
        refs = media_refs(sample)
        assert len(refs) == 1 and set(item.media) == {media_name(refs[0])} == {f"{sample.key}.{refs[0].key[-3:]}"}
        check = check_image if refs[0].key.endswith(".png") else check_video
        assert check(item.media[refs[0].key]) is None, sample.key


def test_tasks_take_turns_and_groups_expand():
    assert [generate(i, tasks=["count", "pair"]).sample.meta["task"] for i in range(4)] == ["count", "pair"] * 2
    assert expand_tasks(["video_qa", "video_when", "rl"]) == ["video_direction", "video_order", "video_when", "rl"]
    assert expand_tasks(None) == list(TASKS)
    with pytest.raises(ValueError, match="unknown synthetic task 'colour'; known: pair"):
        expand_tasks(["colour"])


def test_heldout_split_never_shows_a_train_picture():
    tasks = ["count", "color", "video_when", "video_direction"]
    train = {hashlib.sha1(d).hexdigest() for it in generate_many(400, tasks=tasks) for d in it.media.values()}
    heldout = [it for it in generate_many(100, tasks=tasks, split="heldout")]
    assert all(it.sample.meta["split"] == "heldout" and it.sample.key.startswith("heldout-") for it in heldout)
    assert not train & {hashlib.sha1(d).hexdigest() for it in heldout for d in it.media.values()}
    signatures = [("scene", i) for i in range(800)]
    share = sum(in_split(s, "heldout") for s in signatures) / len(signatures)
    assert all(in_split(s, "train") != in_split(s, "heldout") for s in signatures) and 0.08 < share < 0.17


# --- answers match the pixels ----------------------------------------------------------------------------


def test_count_of_all_shapes_is_the_number_of_blobs():
    checked = 0
    for item in _by_task("count", 60):
        if _question(item) == "How many shapes are there?":
            foreground = np.abs(_pixels(item) - BACKGROUND).sum(-1) > 30
            assert _components(foreground) == int(_reply(item)), item.sample.key
            checked += 1
    assert checked >= 10


def test_color_and_position_answers_match_the_image():
    for item in _by_task("color", 20):
        color = np.array(COLORS[_reply(item)])
        assert (np.abs(_pixels(item) - color).sum(-1) < 10).sum() > 20
    for item in _by_task("position", 40):
        pixels = _pixels(item)
        size = pixels.shape[0]
        color = np.array(COLORS[item.sample.meta["target"].split()[0]])
        ys, xs = np.nonzero(np.abs(pixels - color).sum(-1) < 10)
        side = _reply(item)
        inside = {"left": xs < size / 2, "right": xs >= size / 2, "top": ys < size / 2, "bottom": ys >= size / 2}[side]
        assert inside.any(), item.sample.key  # the target (maybe among same-coloured shapes) is in that half
        assert item.sample.meta["answer"] == side and side in _question(item)


def test_grounding_box_is_integer_0_1000_and_holds_the_object():
    pattern = re.compile(r"^<\|box_start\|>\[\[(\d+),(\d+),(\d+),(\d+)\]\]<\|box_end\|>$")
    for item in _by_task("grounding", 20):
        match = pattern.match(_reply(item))
        assert match, _reply(item)
        x1, y1, x2, y2 = map(int, match.groups())
        assert 0 <= x1 < x2 < 1000 and 0 <= y1 < y2 < 1000
        assert "<|object_ref_start|>the " in _question(item)
        pixels = _pixels(item)
        size = pixels.shape[0]
        box = pixels[y1 * size // 1000 : y2 * size // 1000 + 1, x1 * size // 1000 : x2 * size // 1000 + 1]
        color = np.array(COLORS[item.sample.meta["target"].split()[0]])
        inside = (np.abs(box - color).sum(-1) < 10).sum()
        assert inside >= 0.4 * box.shape[0] * box.shape[1], item.sample.key  # the box is mostly the object


def test_when_answer_is_the_mrope_time_of_the_first_frame_showing_the_shape():
    for item in _by_task("video_when", 12):
        frames, sample_fps = _sampled_frames(item)
        changed = [k for k in range(len(frames)) if np.abs(frames[k] - frames[0]).sum(-1).max() > 100]
        seconds = float(re.match(r"at (\d+\.\d) seconds", _reply(item)).group(1))
        assert changed and changed[0] / sample_fps == seconds, item.sample.key
        assert all(k in changed for k in range(changed[0], len(frames)))  # it stays


def test_direction_answer_is_where_the_shape_goes():
    for item in _by_task("video_direction", 12):
        frames, _ = _sampled_frames(item)
        moved = []
        for frame in (frames[0], frames[-1]):
            ys, xs = np.nonzero(np.abs(frame - BACKGROUND).sum(-1) > 60)
            moved.append((xs.mean(), ys.mean()))
        dx, dy = moved[1][0] - moved[0][0], moved[1][1] - moved[0][1]
        expected = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert _reply(item) == expected, item.sample.key


def test_event_times_are_half_seconds_the_sampler_sees_exactly():
    for seconds in (2, 3, 4):
        frames = seconds * VIDEO_FPS
        times = event_times(frames)
        assert times and all(t * 2 == int(t * 2) and 0 < t < seconds for t in times)
        indices = sample_frame_indices(frames, float(VIDEO_FPS))
        rate = len(indices) / frames * VIDEO_FPS
        for t in times:
            first = next(k for k, index in enumerate(indices) if index >= t * VIDEO_FPS)
            assert first / rate == t


# --- reasoning, preference, RL -----------------------------------------------------------------------------


def test_reasoning_replies_think_then_answer():
    pattern = re.compile(r"^<think>(.+)</think><answer>(.+)</answer>$")
    for item in _by_task("reasoning", 16):
        match = pattern.match(_reply(item))
        assert match and item.sample.thinking_mode == "think"
        assert match.group(2) == item.sample.meta["answer"]
        assert item.sample.meta["answer"] in match.group(1)  # the trace arrives at the answer


def test_preference_pairs_differ_subtly_and_rl_prompts_carry_references():
    for item in _by_task("preference", 28):
        sample = item.sample
        assert sample.chosen.text == sample.meta["answer"] != sample.rejected.text == sample.meta["rejected_answer"]
        assert sample.prompt[-1].role == "user"
        if sample.meta["family"] == "count":
            assert abs(int(sample.chosen.text) - int(sample.rejected.text)) == 1
    families = set()
    for item in _by_task("rl", 40):
        sample = item.sample
        assert sample.reference_answer == sample.meta["answer"] and sample.reward_names == list(RL_REWARDS)
        families.add(sample.meta["family"])
    assert {"count", "video_when"} <= families and not families & {"caption", "grounding"}


# --- the tool ---------------------------------------------------------------------------------------------


def test_tool_writes_identical_webdataset_shards_and_a_jsonl_copy(tmp_path, capsys):
    import webdataset as wds

    tool = _tool()
    args = ["--num-samples", "30", "--heldout", "10", "--shard-size", "20", "--tasks", "count", "video_when"]
    assert tool.main([str(tmp_path / "a"), *args]) == 0
    assert "train: 30 samples in 2 shard(s)" in capsys.readouterr().out
    assert tool.main([str(tmp_path / "b"), *args, "--no-jsonl"]) == 0
    for name in ("train-000000.tar", "train-000001.tar", "heldout-000000.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not (tmp_path / "b" / "train.jsonl").exists()

    # webdataset's own reader sees the samples, their JSON and their media as members
    expected = list(generate_many(30, tasks=["count", "video_when"]))
    read = list(wds.WebDataset(str(tmp_path / "a" / "train-{000000..000001}.tar"), shardshuffle=False))
    assert [r["__key__"] for r in read] == [e.sample.key for e in expected]
    for record, item in zip(read, expected):
        assert Sample.from_json(record["json"].decode()).to_dict() == item.sample.to_dict()
        ((name, data),) = item.media.items()
        assert record[name.split(".", 1)[1]] == data

    lines = (tmp_path / "a" / "heldout.jsonl").read_text().splitlines()
    first = Sample.from_json(lines[0])
    (ref,) = media_refs(first)
    assert ref.key is None and ref.path.startswith("media/heldout/")
    (data,) = generate(0, tasks=["count", "video_when"], split="heldout").media.values()
    assert (tmp_path / "a" / ref.path).read_bytes() == data
