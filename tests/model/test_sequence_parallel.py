"""``parallel.sequence_parallel``: selectable where it can run (Transformer Engine layers, TP > 1), one line
everywhere else, before anything is built (``validate``) and again when a model is built.

Sequence parallelism itself needs TE (Megatron's local norms refuse it), so it runs in ``tests/gpu/``; here:
validation of the shipped tiny blueprint with the flag, and (in ``tests/model/test_te_path.py``'s process)
that qwen3 on local layers refuses it in one line while the vision towers never split their sequence.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from keye.config import load_blueprint
from keye.errors import BlueprintError

TINY = Path(__file__).resolve().parents[2] / "blueprints" / "tiny" / "pretrain.yaml"
ON = ["parallel.sequence_parallel=true"]


@pytest.mark.parametrize("overrides, why", [
    (ON, "needs parallel.tensor > 1"),
    (ON + ["parallel.tensor=2", "precision.fp8.enabled=true", "precision.fp8.backend=torch"],
     "does not run with precision.fp8.backend torch"),
])
def test_sequence_parallel_where_it_cannot_run_is_one_line(keye_registry, overrides, why):
    with pytest.raises(BlueprintError) as info:
        load_blueprint(TINY, overrides, keye_registry)
    message = str(info.value)
    assert "\n" not in message and message.startswith("override 'parallel.sequence_parallel=true': "
                                                       f"parallel.sequence_parallel: {why}"), message


def test_sequence_parallel_with_local_layers_is_one_line_and_with_tp2_it_validates(keye_registry, monkeypatch):
    cfg = load_blueprint(TINY, ON + ["parallel.tensor=2"], keye_registry)  # auto: TE where it runs, decided at build
    assert cfg.parallel.sequence_parallel is True
    monkeypatch.setenv("KEYE_TRANSFORMER_IMPL", "local")
    with pytest.raises(BlueprintError, match="parallel.sequence_parallel: needs Transformer Engine layers, but KEYE_TRANSFORMER_IMPL=local"):
        load_blueprint(TINY, ON + ["parallel.tensor=2"], keye_registry)


def test_the_blueprint_key_chooses_the_layers_too(keye_registry, monkeypatch):
    monkeypatch.delenv("KEYE_TRANSFORMER_IMPL", raising=False)
    with pytest.raises(BlueprintError, match="parallel.sequence_parallel: needs Transformer Engine layers, but "
                                             "model.transformer_impl=local"):
        load_blueprint(TINY, ON + ["parallel.tensor=2", "model.transformer_impl=local"], keye_registry)
    with pytest.raises(BlueprintError, match=r"model.transformer_impl: unknown 'tensorrt'; known: auto, local"):
        load_blueprint(TINY, ["model.transformer_impl=tensorrt"], keye_registry)
