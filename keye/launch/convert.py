"""``keye-launch convert``: released Hugging Face Keye-VL checkpoints ↔ Megatron-Core distributed checkpoints.

    keye-launch convert hf-to-megatron SRC_HF_DIR DST_DIR [--tensor T] [--pipeline P]
    keye-launch convert megatron-to-hf SRC_DIR DST_HF_DIR [--tensor T] [--pipeline P]

``hf-to-megatron`` starts ``T x P`` processes (or uses the ones torchrun started), builds the
``KeyeVLModel`` in that layout, loads the released weights (each rank reads only its PP layers and, where
it can, its TP slices, a layer at a time: `keye.hf.sources.load_module`) and
writes a Megatron-Core distributed checkpoint (the ``torch_dist`` format, on gloo on a CPU machine) exactly
as a training stage writes its weights (`keye.train.stage_weights.save_stage_weights`: published atomically
with a manifest). Such a checkpoint stores *global* tensors with their shard offsets, so it is not tied to
the layout that wrote it: ``megatron-to-hf`` reads it back in any layout (default one process) and writes
the released format. Only renames, splits, concatenations and copies happen, so HF → Megatron → HF is
bit-exact.

The destination of ``hf-to-megatron`` holds::

    DST/keye_checkpoint.json   format, dtype, the layout it was written with, the source
    DST/weights/               the Megatron-Core distributed checkpoint (metadata.json, *.distcp, common.pt,
                               the manifest): the layout of a stage's folder, ``<run>/<stage>/weights/``
    DST/hf/                    config.json and every other non-weight file of the source (tokenizer,
                               processor, chat template, generation config), plus unused.safetensors:
                               the released tensors the model does not use (SigLIP head, packing table)

One layout: a stage starts from a converted checkpoint as from another stage's folder (``init_from: DST``),
and ``megatron-to-hf`` reads ``DST/weights/`` with the stages' own loader. A stage's folder has no ``hf/``
(its config is the blueprint's): ``keye-launch export BLUEPRINT STAGE DST`` writes it in the released format.
Folders written by older versions (``DST/model/``) are refused in one line: convert again.

``KeyeVLModel`` is a plain ``nn.Module`` holding Megatron modules and plain ones (the patch embedding,
the projector), so its sharded state dict is assembled here: Megatron modules give their own (they know
their TP axes and PP layer offsets), plain parameters are replicated ``ShardedTensor``s. To read a converted
checkpoint into a model of any layout: ``load_megatron(DST)``, or
`keye.train.stage_weights.load_weights_from` (``model``, ``DST``) for a ``KeyeVLModel`` built from a blueprint.

The sharded state dict and the writer are `keye.parallel.dist_checkpoint`'s, shared with training
checkpoints.

User errors (missing directory, bad config.json, missing or misnamed weights, a layout the model cannot
be split into, a non-empty destination) are found in the launching process before any worker starts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from keye.errors import KeyeUserError
from keye.hf.config import KeyeVLConfigs, hf_configs
from keye.hf.files import HF_DTYPES, INDEX_NAME, read_config, weight_files
from keye.hf.forward import KeyeVL
from keye.hf.keye_vl import build_keye_vl_model, save_keye_vl
from keye.hf.sources import load_module, open_hf_directory
from keye.hf.weights import check_hf_names
from keye.parallel.dist_checkpoint import is_checkpoint, model_state, save, tensors_only
from keye.train.stage_weights import load_weights_from, weights_folder

#: safetensors' dtype names (headers) → the dtype the model is built in
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
META_NAME = "keye_checkpoint.json"
FORMAT = "keye-vl/megatron-core-dist"
UNUSED_NAME = "unused.safetensors"


# --- checks in the launching process -------------------------------------------------------------------


def check_layout(configs: KeyeVLConfigs, tensor: int, pipeline: int) -> None:
    """The model must split evenly: heads, key/value groups, vocabulary and layers."""
    if tensor < 1 or pipeline < 1:
        raise KeyeUserError(f"--tensor ({tensor}) and --pipeline ({pipeline}) must be at least 1")
    lm, vision = configs.language, configs.vision
    for what, count, by in (
        ("num_attention_heads", lm.num_attention_heads, tensor), ("num_key_value_heads", lm.num_query_groups, tensor),
        ("vocab_size", lm.vocab_size, tensor), ("vision_config.num_attention_heads", vision.num_heads, tensor),
        ("intermediate_size", lm.ffn_hidden_size, tensor), ("num_hidden_layers", lm.num_layers, pipeline),
    ):
        if count % by:
            flag = "--pipeline" if what == "num_hidden_layers" else "--tensor"
            raise KeyeUserError(f"{flag} {by} does not divide {what} = {count}")


def _hf_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Names, shapes and dtypes of a checkpoint's tensors, read from the safetensors headers only."""
    from safetensors import safe_open

    shapes, dtypes = {}, set()
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                shapes[name] = tuple(piece.get_shape())
                dtypes.add(piece.get_dtype())
    return shapes, dtypes


def _read_named(path: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """Only the named tensors of a checkpoint."""
    from safetensors import safe_open

    tensors = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys() if name in names})
    return tensors


def _empty_destination(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise KeyeUserError(f"{path}: destination exists and is not an empty directory")


def prepare_hf_to_megatron(src: Path, dst: Path, tensor: int, pipeline: int) -> None:
    cfg = read_config(src)
    configs = hf_configs(cfg, where=str(src / "config.json"))
    check_layout(configs, tensor, pipeline)
    shapes, dtypes = _hf_shapes(src)
    check_hf_names(shapes, configs, str(src))
    if len(dtypes) != 1:
        raise KeyeUserError(f"{src}: weights mix dtypes {sorted(dtypes)}; convert them to one dtype first")
    if not dtypes <= set(SAFETENSORS_DTYPES):
        raise KeyeUserError(f"{src}: weights are {dtypes.pop()}; keye converts {', '.join(SAFETENSORS_DTYPES)}")
    _empty_destination(dst)


def read_meta(src: Path) -> dict:
    if not src.is_dir():
        raise KeyeUserError(f"{src}: not a directory")
    meta_file = src / META_NAME
    if not meta_file.is_file():
        stage = " (a stage's folder: keye-launch export BLUEPRINT STAGE DST writes it)" if is_checkpoint(
            weights_folder(src)) else ""
        raise KeyeUserError(f"{src}: no {META_NAME} (not written by keye-launch convert hf-to-megatron){stage}")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise KeyeUserError(f"{meta_file}: not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("dtype") not in HF_DTYPES:
        raise KeyeUserError(f"{meta_file}: unknown format {meta.get('format')!r} / dtype {meta.get('dtype')!r}")
    if not is_checkpoint(weights_folder(src)):
        if is_checkpoint(src / "model"):
            raise KeyeUserError(f"{src}: written by an older keye-launch convert (model/ instead of weights/); "
                                "convert the Hugging Face checkpoint again")
        raise KeyeUserError(f"{weights_folder(src)}: no Megatron-Core distributed checkpoint (metadata.json missing)")
    return meta


def prepare_megatron_to_hf(src: Path, dst: Path, tensor: int, pipeline: int) -> None:
    read_meta(src)
    configs = hf_configs(read_config(src / "hf"), where=str(src / "hf" / "config.json"))
    check_layout(configs, tensor, pipeline)
    _empty_destination(dst)


# --- the work, on every rank ---------------------------------------------------------------------------


def _copy_assets(src: Path, dst: Path) -> None:
    """Every non-weight file of a checkpoint directory (tokenizer, processor, chat template, configs)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name.endswith(".safetensors") or item.name in (INDEX_NAME, UNUSED_NAME, META_NAME):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dst / item.name)


def hf_to_megatron(src: Path, dst: Path, tensor: int, pipeline: int) -> None:
    """Run on each of the ``tensor x pipeline`` ranks (after ``prepare_hf_to_megatron``)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from keye.parallel import init_parallel

    parallel = init_parallel(tensor=tensor, pipeline=pipeline)
    cfg = read_config(src)
    configs = hf_configs(cfg)
    shapes, dtypes = _hf_shapes(src)
    unused = check_hf_names(shapes, configs, str(src))
    dtype = SAFETENSORS_DTYPES[dtypes.pop()]
    model = build_keye_vl_model(configs, dtype, parallel)
    source = open_hf_directory(src, str(src))
    for module in source.modules:  # streamed: each rank reads only what it holds, a layer at a time
        load_module(model, source, module, str(src))
    if parallel.rank == 0:
        _copy_assets(src, dst / "hf")
        kept = _read_named(src, set(unused))
        save_file(kept, str(dst / "hf" / UNUSED_NAME), metadata={"format": "pt"})
    dist.barrier()
    save(tensors_only(model_state(model)), weights_folder(dst))  # as a stage writes its weights
    if parallel.rank == 0:
        meta = {"format": FORMAT, "dtype": str(dtype).removeprefix("torch."), "tensor": tensor, "pipeline": pipeline,
                "source": str(src.resolve())}
        (dst / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    dist.barrier()


def load_megatron(src: Path, tensor: int = 1, pipeline: int = 1) -> KeyeVL:
    """A ``KeyeVL`` built in this layout from a checkpoint written by ``hf_to_megatron`` (in any layout)."""
    from safetensors.torch import load_file

    from keye.parallel import init_parallel

    meta = read_meta(src)
    parallel = init_parallel(tensor=tensor, pipeline=pipeline)
    cfg = read_config(src / "hf")
    model = build_keye_vl_model(hf_configs(cfg), HF_DTYPES[meta["dtype"]], parallel)
    load_weights_from(model, src)  # the stages' loader: every module of the model, checked, resharded
    unused = load_file(str(src / "hf" / UNUSED_NAME)) if (src / "hf" / UNUSED_NAME).is_file() else {}
    generation = src / "hf" / "generation_config.json"
    generation_config = json.loads(generation.read_text()) if generation.is_file() else None
    return KeyeVL(model.eval(), cfg, unused, generation_config)


def megatron_to_hf(src: Path, dst: Path, tensor: int, pipeline: int) -> None:
    """Run on each of the ``tensor x pipeline`` ranks (after ``prepare_megatron_to_hf``)."""
    import torch.distributed as dist

    wrapper = load_megatron(src, tensor, pipeline)
    if dist.get_rank() == 0:
        _copy_assets(src / "hf", dst)
    save_keye_vl(wrapper, dst)  # writes config.json and the weights over the copied assets


DIRECTIONS = {
    "hf-to-megatron": (prepare_hf_to_megatron, hf_to_megatron),
    "megatron-to-hf": (prepare_megatron_to_hf, megatron_to_hf),
}


def run_convert(direction: str, src: str, dst: str, tensor: int = 1, pipeline: int = 1) -> int:
    """Check the request here, then convert in ``tensor x pipeline`` processes (spawned unless launched)."""
    from keye.launch.spawn import spawn_local, under_launcher

    prepare, work = DIRECTIONS[direction]
    src_path, dst_path = Path(src), Path(dst)
    world = tensor * pipeline
    if not under_launcher():
        prepare(src_path, dst_path, tensor, pipeline)
        if world > 1:
            argv = ["convert", direction, src, dst, "--tensor", str(tensor), "--pipeline", str(pipeline)]
            return spawn_local(world, argv)  # each child finds the launcher's environment and runs `work`
    work(src_path, dst_path, tensor, pipeline)
    if torch.distributed.get_rank() == 0:
        print(f"converted {src} -> {dst} ({direction}, tensor {tensor} x pipeline {pipeline})")
    return 0
