"""Data sources on real shards and files: same samples everywhere, disjoint sharding, bad input counted.

Bad input is made for real: a shard cut in the middle of a member, a JSON member that is not JSON, an image
of random bytes, an MP4 cut in half, a JSONL line that is not JSON.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import random
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from keye.config import build_component_config
from keye.data.sources import BadInputCounter, BadInputError, LoadedSample
from keye.data.synthetic import generate_many
from keye.errors import KeyeUserError
from keye.model.protocols import BuildContext
from keye_plugins.data_source.jsonl import JsonlSource
from keye_plugins.data_source.synthetic import SyntheticSource
from keye_plugins.data_source.webdataset import WebDatasetSource

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["count", "video_when", "pair", "preference"]
NUM_SHARDS, PER_SHARD = 8, 3


def _tool():
    spec = importlib.util.spec_from_file_location("make_synthetic_data", ROOT / "tools" / "make_synthetic_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _samples(n: int = NUM_SHARDS * PER_SHARD) -> list[LoadedSample]:
    return list(generate_many(n, tasks=TASKS, seed=1))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("shards")
    return _tool().write_shards(_samples(), str(out / "part-%06d.tar"), PER_SHARD)


def _wds(urls, **kwargs) -> WebDatasetSource:
    rank, world = kwargs.pop("rank", None), kwargs.pop("world_size", None)
    return WebDatasetSource(WebDatasetSource.Config(urls=list(urls), **kwargs), rank=rank, world_size=world)


def _keys(items) -> list[str]:
    return [item.sample.key for item in items]


def _identity(item):
    return item


# --- the same samples through every source ------------------------------------------------------------------


def test_webdataset_jsonl_and_synthetic_yield_the_generated_samples(shards, tmp_path):
    expected = _samples()
    brace = shards[0].replace("000000", "{000000..%06d}" % (NUM_SHARDS - 1))
    from_shards = list(_wds([brace]))
    assert [(s.sample.to_dict(), s.media) for s in from_shards] == [(e.sample.to_dict(), e.media) for e in expected]
    assert from_shards[0].origin == f"{shards[0]}:{expected[0].sample.key}"

    _tool().write_jsonl(_samples(), tmp_path / "data.jsonl", "media")
    from_jsonl = list(JsonlSource(JsonlSource.Config(path=str(tmp_path / "data.jsonl"))))
    assert _keys(from_jsonl) == _keys(expected)
    assert [list(s.media.values()) for s in from_jsonl] == [list(e.media.values()) for e in expected]
    assert list(from_jsonl[0].media) == [f"media/{expected[0].sample.key}.png"]

    generated = list(SyntheticSource(SyntheticSource.Config(tasks=TASKS, seed=1, num_samples=len(expected))))
    assert [(s.sample.to_json(), s.media) for s in generated] == [(e.sample.to_json(), e.media) for e in expected]


def test_built_from_a_blueprint_node_through_the_registered_hook(keye_empty_host, shards):
    import keye_plugins.data_source.jsonl as jsonl
    import keye_plugins.data_source.synthetic as synthetic
    import keye_plugins.data_source.webdataset as webdataset

    for module in (webdataset, jsonl, synthetic):
        keye_empty_host.add_plugin(module, module.__name__.rsplit(".", 1)[1])
    registry = keye_empty_host.registry
    assert [registry.cls("data_source", n) for n in ("webdataset", "jsonl", "synthetic")] == [
        WebDatasetSource, JsonlSource, SyntheticSource,
    ]  # fmt: skip
    cls, config = build_component_config("data_source", {"name": "webdataset", "urls": shards[:2]}, registry)
    assert len(list(cls(config))) == 2 * PER_SHARD
    node = {"name": "synthetic", "tasks": ["ocr"], "num_samples": 3}
    cls, config = build_component_config("data_source", node, registry)
    assert [item.sample.meta["task"] for item in cls(config)] == ["ocr"] * 3


# --- sharding -------------------------------------------------------------------------------------------------


def test_two_ranks_times_two_workers_read_disjoint_shards_covering_all(shards):
    seen: dict[tuple[int, int], set[str]] = {}
    for rank in range(2):
        loader = torch.utils.data.DataLoader(
            _wds(shards, rank=rank, world_size=2), batch_size=None, num_workers=2, collate_fn=_identity
        )
        for item in loader:
            shard = item.origin.rsplit(":", 1)[0]
            seen.setdefault((rank, shards.index(shard)), set()).add(item.sample.key)
    readers: dict[int, set[tuple[int, int]]] = {}
    for (rank, shard), keys in seen.items():
        readers.setdefault(shard, set()).add(rank)
        assert len(keys) == PER_SHARD
    assert sorted(readers) == list(range(NUM_SHARDS))  # every shard read ...
    assert all(len(ranks) == 1 for ranks in readers.values())  # ... by one rank only
    assert {shard for (rank, shard) in seen if rank == 0} == {0, 2, 4, 6}  # ranks split first
    all_keys = [key for keys in seen.values() for key in keys]
    assert sorted(all_keys) == sorted(_keys(_samples()))


def test_worker_slots_split_a_rank_and_ranks_come_from_the_context(shards, tmp_path):
    source = _wds(shards, rank=1, world_size=2)
    by_worker = [[i for i in range(NUM_SHARDS) if source.mine(i, (1, 2, w, 2))] for w in range(2)]
    assert by_worker == [[1, 5], [3, 7]]

    ctx = BuildContext(parallel=SimpleNamespace(dp_rank=1, dp_size=2))
    from_ctx = WebDatasetSource(WebDatasetSource.Config(urls=shards), ctx)
    assert (from_ctx.rank, from_ctx.world_size) == (1, 2)
    assert _keys(from_ctx) == _keys(source)

    config = SyntheticSource.Config(tasks=TASKS, num_samples=10)
    halves = [SyntheticSource(config, rank=rank, world_size=2) for rank in (0, 1)]
    keys = [set(_keys(h)) for h in halves]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 10

    with pytest.raises(KeyeUserError, match="2 shard\\(s\\) cannot feed 3 data-parallel ranks"):
        _wds(shards[:2], rank=0, world_size=3)
    with pytest.raises(KeyeUserError, match="shard not found: .*nope-000000.tar"):
        _wds([str(tmp_path / "nope-{000000..000001}.tar")])


def test_shuffle_buffer_is_seeded_per_pass_and_keeps_every_sample(shards):
    plain = _keys(_wds(shards))
    source = _wds(shards, shuffle_buffer=5, seed=7)
    first, second = _keys(source), _keys(source)
    assert sorted(first) == sorted(second) == sorted(plain)
    assert first != plain and first != second
    again = _wds(shards, shuffle_buffer=5, seed=7)
    assert _keys(again) == first
    again.set_epoch(1)
    assert _keys(again) == second


# --- bad input ------------------------------------------------------------------------------------------------


def _bad_shard(path: Path, items: list[LoadedSample], replace: dict[int, tuple[str, bytes]]) -> str:
    """Write ``items`` with webdataset's TarWriter; ``replace[i] = (extension, bytes)`` overrides a member."""
    import webdataset as wds

    with wds.TarWriter(str(path), mtime=0.0) as sink:
        for i, item in enumerate(items):
            record = {"__key__": item.sample.key, "json": item.sample.to_json().encode()}
            for name, data in item.media.items():
                record[name.split(".", 1)[1]] = data
            if i in replace:
                record[replace[i][0]] = replace[i][1]
            sink.write(record)
    return str(path)


def _truncated_copy(shard: str, out: Path, member_index: int) -> tuple[str, str]:
    """Copy ``shard`` cut halfway through the data of member ``member_index``; returns (path, member name)."""
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[member_index]
    data = Path(shard).read_bytes()[: member.offset_data + member.size // 2]
    out.write_bytes(data)
    return str(out), member.name


def test_each_kind_of_bad_input_is_skipped_counted_and_logged(shards, tmp_path, caplog):
    items = _samples()[:8]  # tasks cycle count, video_when, pair, preference
    rng = random.Random(0)
    broken = _bad_shard(
        tmp_path / "broken.tar",
        items,
        {
            0: ("json", b'{"kind": "conversation", "key": '),  # not JSON
            2: ("png", rng.randbytes(300)),  # not an image
            5: ("mp4", items[5].media[f"{items[5].sample.key}.mp4"][:1500]),  # an MP4 cut in half: no index
        },
    )
    # a second shard cut inside the image of its 3rd sample (members: json, png per sample)
    cut, member = _truncated_copy(shards[0], tmp_path / "cut.tar", member_index=5)
    assert member == f"{_samples()[2].sample.key}.png"

    with caplog.at_level(logging.WARNING, logger="keye.data"):
        source = _wds([broken, cut], max_bad_fraction=0.5)
        good = _keys(source)
    counts = source.bad_inputs.counts
    assert counts == {"invalid_json": 1, "corrupt_image": 1, "unreadable_video": 1, "truncated_member": 1}
    assert good == [items[i].sample.key for i in (1, 3, 4, 6, 7)] + _keys(_samples()[:2])
    assert (source.bad_inputs.good, source.bad_inputs.bad) == (7, 4)
    logged = caplog.text
    for key, kind in ((items[0].sample.key, "invalid_json"), (items[2].sample.key, "corrupt_image"),
                      (items[5].sample.key, "unreadable_video"), (_samples()[2].sample.key, "truncated_member")):
        assert f"skipped '{key}' ({kind})" in logged  # fmt: skip

    strict = _wds([broken, cut], max_bad_fraction=0.25)
    with pytest.raises(BadInputError) as failure:
        list(strict)
    message = str(failure.value)
    assert "\n" not in message and "4 of 11 samples were bad (36.4% > max_bad_fraction 25.0%)" in message
    assert "truncated_member 1, invalid_json 1, corrupt_image 1, unreadable_video 1" in message


def test_truncated_gzip_and_plain_json_pairs(tmp_path):
    items = _samples()[:3]
    plain = _bad_shard(tmp_path / "pair.tar", [items[2]], {0: ("txt", b"a red circle")})
    with tarfile.open(plain) as tar:  # drop the JSON member: a bare image + caption pair remains
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if not m.name.endswith(".json")]
    bare = tmp_path / "bare.tar.gz"
    with tarfile.open(bare, "w:gz") as out:
        for member, data in members:
            out.addfile(member, io.BytesIO(data))
    (pair,) = list(_wds([str(bare)]))
    assert pair.sample.kind == "pair" and pair.sample.caption == "a red circle"
    assert pair.media[pair.sample.image.key] == items[2].media[f"{items[2].sample.key}.png"]

    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(bare.read_bytes()[: bare.stat().st_size // 2])  # inside the compressed image
    source = _wds([str(cut)], max_bad_fraction=1.0)
    assert list(source) == [] and source.bad_inputs.counts == {"truncated_member": 1}


def test_jsonl_counts_bad_lines_by_line_number_and_missing_files(tmp_path, caplog):
    _tool().write_jsonl(_samples()[:4], tmp_path / "data.jsonl", "media")
    lines = (tmp_path / "data.jsonl").read_text().splitlines()
    lines.insert(1, "{not json")
    lines.insert(3, '{"kind": "pair", "key": "k", "caption": "x"}')  # valid JSON, no image: not a sample
    lines.append("")
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "media" / f"{_samples()[3].sample.key}.png").unlink()

    with caplog.at_level(logging.WARNING, logger="keye.data"):
        source = JsonlSource(JsonlSource.Config(path=str(tmp_path / "data.jsonl"), max_bad_fraction=0.5))
        assert _keys(source) == _keys(_samples()[:3])
    assert source.bad_inputs.counts == {"invalid_json": 1, "invalid_sample": 1, "missing_media": 1}
    assert f"skipped '{tmp_path / 'data.jsonl'}:2' (invalid_json)" in caplog.text
    assert "field 'image': missing" in caplog.text
    with pytest.raises(BadInputError, match="3 of 6 samples were bad"):
        list(JsonlSource(JsonlSource.Config(path=str(tmp_path / "data.jsonl"), max_bad_fraction=0.4)))


def test_counter_fails_only_past_the_share_and_after_enough_samples():
    counter = BadInputCounter("demo", max_bad_fraction=0.25, min_seen=4)
    counter.skip("corrupt_image", "a", "random bytes")  # 1 of 1, but too few seen to judge
    for _ in range(3):
        counter.ok()
    with pytest.raises(BadInputError, match="'demo': 2 of 5 samples were bad .*missing_media 1, corrupt_image 1"):
        counter.skip("missing_media", "b", "not there")  # 2 of 5 = 40% > 25%, and enough seen to judge
    ok = BadInputCounter("demo", max_bad_fraction=0.25, min_seen=4)
    for _ in range(3):
        ok.ok()
    ok.skip("invalid_json", "c", "x")  # 1 of 4 = 25%: at the limit, not over it
    ok.check()
    with pytest.raises(ValueError, match="unknown bad-input kind 'weird'"):
        ok.skip("weird", "d", "?")
