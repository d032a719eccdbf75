"""export/metadata.py: one typed reader and writer of the export metadata, by hand."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_config

from export.metadata import (
    ExportMetadata,
    build_metadata,
    prompt_path,
    read_engine_metadata,
    read_metadata,
    sidecar_path,
    write_engine_sidecar,
)


def _meta(dynamic: bool = False) -> ExportMetadata:
    return build_metadata(tiny_config(), branch="teacher", max_detections=7, score_threshold=0.2, dynamic=dynamic, input_size=(128, 160))


def test_dict_round_trip_and_extra_keys():
    meta = _meta()
    assert ExportMetadata.from_dict(meta.to_dict()) == meta
    with_extra = ExportMetadata.from_dict({**meta.to_dict(), "precision": "fp16"})
    assert with_extra.extra == {"precision": "fp16"} and with_extra.to_dict()["precision"] == "fp16"
    assert meta.model_version == "unsaved-teacher" and meta.class_names == ["class_0", "class_1", "class_2"]


def test_missing_keys_are_named():
    values = _meta().to_dict()
    del values["pixel_mean"], values["max_detections"]
    with pytest.raises(ValueError, match=r"\['max_detections', 'pixel_mean'\]"):
        ExportMetadata.from_dict(values, "x.onnx")


def test_fixed_canvas_and_input_spec():
    fixed, dynamic = _meta(False), _meta(True)
    assert fixed.fixed_hw == (128, 160) and fixed.input_size == [128, 160]
    assert dynamic.fixed_hw is None and dynamic.input_size is None and dynamic.example_input_size == [128, 160]
    cfg = tiny_config()
    spec = fixed.input_spec()
    assert (spec.min_size, spec.max_size, spec.fixed_hw) == (cfg.input.min_size_test, cfg.input.max_size_test, (128, 160))
    assert spec.pixel_mean == tuple(cfg.input.pixel_mean) and spec.channel_format == cfg.input.format


def test_engine_sidecar_and_file_names(tmp_path):
    engine = tmp_path / "m.engine"
    write_engine_sidecar(engine, _meta().replace(extra={"precision": "fp32"}))
    assert sidecar_path(engine).name == "m.engine.json" and json.loads(sidecar_path(engine).read_text())["precision"] == "fp32"
    assert read_engine_metadata(engine).extra == {"precision": "fp32"} and read_metadata(engine).max_detections == 7
    assert prompt_path(tmp_path / "model.onnx").name == "model.prompt.onnx" and prompt_path(engine).name == "m.prompt.engine"
    with pytest.raises(FileNotFoundError, match="sidecar"):
        read_engine_metadata(tmp_path / "other.engine")
    with pytest.raises(ValueError, match="unknown exported model type"):
        read_metadata(tmp_path / "model.bin")
