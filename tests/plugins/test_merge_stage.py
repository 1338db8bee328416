"""The merge stage's checkpoint merge: Megatron-Core distributed checkpoints written by 2 tensor-parallel
ranks, merged in 1 and in 3 processes (each reading only its share), equal to the weighted average by hand."""

from pathlib import Path

import pytest
import torch

from keye.errors import KeyeUserError
from keye.parallel.dist_checkpoint import read_full_tensors
from keye.testing.distributed import run_distributed


def _full(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.w": torch.randn(6, 4, generator=g),  # cut by rows when writing; 3 divides 6 when merging
        "m.layers": torch.randn(3, 2, 4, generator=g),  # layer-stacked, cut on its last axis when writing
        "m.b": torch.randn(5, generator=g),  # replicated; 3 does not divide 5: merged whole by one rank
        "m.half": torch.randn(7, generator=g).to(torch.bfloat16),
    }


def _write_tp2(folder: str, seed: int, extra: bool = False) -> None:
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from keye.parallel import init_parallel
    from keye.parallel.dist_checkpoint import save

    init_parallel(tensor=2)
    rank, full = dist.get_rank(), _full(seed)
    state = {
        "w": ShardedTensor.from_rank_offsets("m.w", full["m.w"].chunk(2, 0)[rank].clone(), (0, rank, 2), replica_id=0),
        "layers": ShardedTensor.from_rank_offsets("m.layers", full["m.layers"].chunk(2, 2)[rank].clone(), (2, rank, 2),
                                                  replica_id=0),
        "b": ShardedTensor.from_rank_offsets("m.b", full["m.b"].clone(), replica_id=rank),
        "half": ShardedTensor.from_rank_offsets("m.half", full["m.half"].clone(), replica_id=rank),
    }
    if extra:
        state["x"] = ShardedTensor.from_rank_offsets("m.extra", torch.zeros(2), replica_id=rank)
    save(state, folder)


def _merge(folders: list[str], out: str, weights: list[float]) -> None:
    from keye.parallel import init_parallel
    from keye_plugins.merger.linear_soup import LinearSoup
    from keye_plugins.stage.merge import merge_checkpoints

    init_parallel()
    merge_checkpoints([Path(f) for f in folders], weights, LinearSoup(LinearSoup.Config()), Path(out))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    for name, seed in (("a", 1), ("b", 2)):
        run_distributed(_write_tp2, 2, str(root / name), seed)
    return root


@pytest.mark.parametrize("nprocs", [1, 3])
def test_merge_equals_the_weighted_average_by_hand(inputs, nprocs):
    out = inputs / f"merged{nprocs}"
    run_distributed(_merge, nprocs, [str(inputs / "a"), str(inputs / "b")], str(out), [1.0, 3.0])
    merged, a, b = read_full_tensors(out), _full(1), _full(2)
    assert sorted(merged) == sorted(a)
    for key in a:
        expected = (0.25 * a[key].double() + 0.75 * b[key].double()).to(a[key].dtype)
        assert merged[key].dtype == a[key].dtype
        assert torch.equal(merged[key], expected), key
    assert torch.equal(read_full_tensors(inputs / "a")["m.w"], a["m.w"])  # the inputs were written whole, in shards


def test_checkpoints_with_different_tensors_are_refused(inputs):
    run_distributed(_write_tp2, 2, str(inputs / "c"), 3, True)
    with pytest.raises(Exception, match=r"cannot be merged with .*tensors differ \(e.g. \['m.extra'\]\)") as info:
        run_distributed(_merge, 1, [str(inputs / "a"), str(inputs / "c")], str(inputs / "bad"), [1.0, 1.0])
    assert KeyeUserError.__name__ in str(info.value)
