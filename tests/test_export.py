"""ONNX export: onnxruntime equals torch (max abs diff < 1e-4) for batches 1 and 3; the input contract
(raw RGB normalised inside the graph by default); metadata; the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from passreid.cli import main  # noqa: E402
from passreid.errors import CheckpointError, ConfigError  # noqa: E402
from passreid.export import export_onnx, onnx_metadata, verify_onnx  # noqa: E402
from passreid.models import ReIDModel, create_model  # noqa: E402

SIZE = (64, 32)


def normalised(images: torch.Tensor) -> torch.Tensor:
    """What the torch model takes: RGB in [0, 1] normalised with mean and std 0.5 (the evaluation path)."""
    return (images - 0.5) / 0.5


def tiny_reid(**kwargs) -> ReIDModel:
    torch.manual_seed(0)
    model = ReIDModel(create_model("pass_vit_tiny", img_size=SIZE, depth=2), num_classes=3, **kwargs)
    with torch.no_grad():  # trained-looking neck statistics, so the after-neck path is not an identity
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ReIDModel]:
    model = tiny_reid(fusion="mean", neck="single", test_feature="after", neck_names="cluster")
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    report = export_onnx(model, out)
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert report.img_size == SIZE and report.feat_dim == 192 and report.opset == 18
    return out, model


@pytest.mark.parametrize("batch", [1, 3])
def test_raw_rgb_in_the_graph_gives_the_torch_features_of_the_normalised_image(
    exported: tuple[Path, ReIDModel], batch: int
) -> None:
    path, model = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.rand(batch, 3, *SIZE, generator=torch.Generator().manual_seed(batch))  # RGB in [0, 1]
    with torch.no_grad():
        expected = model(normalised(images)).numpy()
        unnormalised = model(images).numpy()
    got = session.run(["features"], {"images": images.numpy()})[0]
    assert got.shape == (batch, 192)
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(unnormalised - expected).max() > 1e-2  # the normalisation matters: it is in the graph
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_graph_has_a_dynamic_batch_and_metadata(exported: tuple[Path, ReIDModel]) -> None:
    proto = onnx.load(str(exported[0]))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch
    assert [d.dim_value for d in dims[1:]] == [3, *SIZE]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    meta = onnx_metadata(exported[0])
    assert json.loads(meta["img_size"]) == list(SIZE) and meta["feat_dim"] == "192"
    assert json.loads(meta["mean"]) == [0.5, 0.5, 0.5] and meta["input"] == "float"
    assert meta["resize"] == "bicubic"  # a cluster-contrast layout (neck_names="cluster")
    assert meta["input_contract"] == (
        "images: (batch, 3, 64, 32) RGB resized to 64x32 (bicubic), float32 in [0, 1]; "
        "the graph normalises (x - mean) / std with mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]")


@pytest.mark.parametrize("input_format", ["uint8", "normalised"])
def test_uint8_and_pre_normalised_inputs(tmp_path: Path, input_format: str) -> None:
    model = tiny_reid()
    path = tmp_path / f"{input_format}.onnx"
    report = export_onnx(model, path, input_format=input_format)
    assert report.input_format == input_format and report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixels = torch.randint(0, 256, (2, 3, *SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(normalised(pixels.float() / 255)).numpy()
    fed = pixels if input_format == "uint8" else normalised(pixels.float() / 255)
    got = session.run(None, {"images": fed.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4
    meta = onnx_metadata(path)
    assert meta["input"] == input_format and meta["resize"] == "bilinear"  # the fine-tuned layout
    assert ("uint8 in 0..255" in meta["input_contract"]) == (input_format == "uint8")
    assert ("already normalised" in meta["input_contract"]) == (input_format == "normalised")


def test_verify_catches_a_different_model(exported: tuple[Path, ReIDModel]) -> None:
    other = tiny_reid(fusion="mean", neck="single", test_feature="after", neck_names="cluster")
    with torch.no_grad():
        other.base.norm.weight.mul_(-1)  # a different model: its features disagree with the graph
    with pytest.raises(CheckpointError, match="differs from torch"):
        verify_onnx(exported[0], other)


def test_export_command_from_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "finetuned.pth"
    model = tiny_reid()
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "m.onnx"
    assert main(["export-onnx", str(ckpt), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "input  images: (batch, 3, 64, 32) RGB resized to 64x32 (bilinear), float32 in [0, 1]; the graph " \
           "normalises (x - mean) / std" in printed
    assert "(batch, 384) float32, L2-normalised" in printed and "max abs diff" in printed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        expected = model(normalised(images)).numpy()
    assert np.abs(session.run(None, {"images": images.numpy()})[0] - expected).max() < 1e-4
    with pytest.raises(ConfigError, match="opset 13"):
        export_onnx(model, tmp_path / "old.onnx", opset=13)
    with pytest.raises(ConfigError, match="input_format must be one of float, uint8, normalised"):
        export_onnx(model, tmp_path / "bgr.onnx", input_format="bgr")  # type: ignore[arg-type]
    assert main(["export-onnx", str(tmp_path / "missing.pth"), str(out)]) == 2


def test_torchscript_exporter_gives_the_same_contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch before 2.8 exports with the TorchScript exporter; forced here so that every torch runs that path."""
    from passreid import _compat

    monkeypatch.setattr(_compat, "DYNAMO_ONNX_EXPORT", False)
    model = tiny_reid(fusion="mean", neck="single", test_feature="after", neck_names="cluster")
    report = export_onnx(model, tmp_path / "ts.onnx")  # verified with onnxruntime on batches 1 and 3
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4 and report.opset == 18
    proto = onnx.load(str(tmp_path / "ts.onnx"))
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["features"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, *SIZE]
    assert {p.key: p.value for p in proto.metadata_props}["feat_dim"] == "192"

