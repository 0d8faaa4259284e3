"""The published Genesis weights are in (x, y, z) kernel order, our cubes are (z, y, x):
the official-layout loader permutes every 3D kernel so that our model on a transposed cube
reproduces the official model's output, transposed, and the writer permutes back.

The reference is an independent functional forward of MrGiovanni/ModelsGenesis
pytorch/unet3d.py (ContBatchNorm3d = batch statistics in every mode), run on the official
(N, 1, X, Y, Z) cube with the file's tensors exactly as stored."""

from __future__ import annotations

import pathlib

import pytest
import torch

from pipeline.model_io.official import (convert_kernel_axes, load_official_genesis, read_official_state_dict,
                                        save_official_layout)
from pipeline.models.classifier import UNet3DClassifier
from pipeline.models.unet3d import UNet3D
from test_models import DECODER, ENCODER, functional_forward

BASE = 4
#: Official cube sides (X, Y, Z): all different, so a wrong axis order cannot pass.
XYZ = (32, 24, 16)


def to_zyx(t: torch.Tensor) -> torch.Tensor:
    """(N, C, X, Y, Z) <-> (N, C, Z, Y, X)."""
    return t.permute(0, 1, 4, 3, 2)


def official_state_dict(base: int = BASE, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the reference UNet3D's keys and shapes, built here by hand from
    the reference architecture (not from our model), kernels (.., kx, ky, kz)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(key: str, cout: int, cin: int, k: int, transposed: bool = False) -> None:
        shape = (cin, cout, k, k, k) if transposed else (cout, cin, k, k, k)
        sd[f"{key}.weight"] = torch.randn(shape, generator=g) * (2.0 / (cin * k**3)) ** 0.5
        sd[f"{key}.bias"] = 0.1 * torch.randn(cout, generator=g)

    def luconv(prefix: str, cin: int, cout: int) -> None:
        conv(f"{prefix}.conv1", cout, cin, 3)
        sd[f"{prefix}.bn1.weight"] = 0.5 + torch.rand(cout, generator=g)
        sd[f"{prefix}.bn1.bias"] = 0.2 * torch.randn(cout, generator=g)
        sd[f"{prefix}.bn1.running_mean"] = 0.2 * torch.randn(cout, generator=g)
        sd[f"{prefix}.bn1.running_var"] = 0.5 + torch.rand(cout, generator=g)
        sd[f"{prefix}.bn1.num_batches_tracked"] = torch.tensor(7)

    cin = 1
    for depth, name in enumerate(ENCODER):
        mid = base * 2**depth
        luconv(f"{name}.ops.0", cin, mid)
        luconv(f"{name}.ops.1", mid, 2 * mid)
        cin = 2 * mid
    for depth, name in zip((2, 1, 0), DECODER):
        c, out = base * 2 ** (depth + 2), base * 2 ** (depth + 1)
        conv(f"{name}.up_conv", c, c, 2, transposed=True)
        luconv(f"{name}.ops.0", c + c // 2, out)
        luconv(f"{name}.ops.1", out, out)
    conv("out_tr.final_conv", 1, 2 * base, 1)
    return sd


# The reference UNet3D (pytorch/unet3d.py) in torch.nn.functional only, the same independent forward that
# tests/test_models.py checks our model against; here it runs on the official layout: x is (N, 1, X, Y, Z)
# and the state dict is as stored in the official file.
reference_forward = functional_forward


@pytest.fixture
def official_file(tmp_path) -> tuple[pathlib.Path, dict[str, torch.Tensor]]:
    sd = official_state_dict()
    path = tmp_path / "Genesis_Chest_CT.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer_state_dict": {}, "epoch": 3}, path)
    return path, sd


def official_cube(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, 1, *XYZ), generator=torch.Generator().manual_seed(seed))


def test_loaded_model_on_zyx_cube_equals_reference_on_xyz_cube(official_file):
    path, sd = official_file
    x = official_cube()
    model = load_official_genesis(path).eval()
    assert model.base_channels == BASE
    with torch.no_grad():
        want = reference_forward(sd, x)
        got = to_zyx(model(to_zyx(x)))
    assert want.shape == got.shape == x.shape
    assert want.std() > 1e-2  # a non-trivial, non-saturated output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # Kernels are (z, y, x) in the model, biases and norms untouched.
    first = model.down_tr64.ops[0].conv1.weight
    assert torch.equal(first, sd["down_tr64.ops.0.conv1.weight"].permute(0, 1, 4, 3, 2))
    assert torch.equal(model.up_tr64.up_conv.weight, sd["up_tr64.up_conv.weight"].permute(0, 1, 4, 3, 2))
    assert torch.equal(model.down_tr64.ops[0].bn1.weight, sd["down_tr64.ops.0.bn1.weight"])
    assert torch.equal(model.up_tr64.up_conv.bias, sd["up_tr64.up_conv.bias"])


def test_without_the_permutation_the_outputs_differ(official_file):
    """The check above can fail: loading the kernels unchanged (axes="zyx", the old
    behaviour) or permuting the cube without the kernels gives another output."""
    path, sd = official_file
    x = official_cube()
    unpermuted = load_official_genesis(path, axes="zyx").eval()
    permuted = load_official_genesis(path).eval()
    with torch.no_grad():
        want = reference_forward(sd, x)
        wrong_kernels = to_zyx(unpermuted(to_zyx(x)))
        wrong_cube = permuted(x)  # kernels (z, y, x), cube left in (x, y, z)
        right = to_zyx(permuted(to_zyx(x)))
    torch.testing.assert_close(right, want, atol=1e-5, rtol=1e-4)
    assert (wrong_kernels - want).abs().max() > 1e-2
    assert (wrong_cube - want).abs().max() > 1e-2
    # A swap of any two spatial axes (instead of the reversal) is wrong too.
    for order in ((0, 1, 3, 2, 4), (0, 1, 2, 4, 3)):
        swapped = {k: v.permute(*order).contiguous() if v.dim() == 5 else v for k, v in sd.items()}
        model = UNet3D(base_channels=BASE)
        model.load_state_dict(swapped)
        with torch.no_grad():
            assert (to_zyx(model.eval()(to_zyx(x))) - want).abs().max() > 1e-2, order


def test_round_trip_is_the_identity_and_the_export_is_official(official_file, tmp_path):
    path, sd = official_file
    model = load_official_genesis(path)
    out = tmp_path / "exported.pt"
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    model.eval()(torch.randn(2, 1, 16, 16, 16)).mean().backward()  # eval: running stats kept
    opt.step()  # lr 0: momentum buffers shaped like the kernels, weights still the file's
    save_official_layout(model, out, optimizer=opt, epoch=5)

    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert raw["epoch"] == 5
    exported = {k[len("module."):]: v for k, v in raw["state_dict"].items()}
    assert exported.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(exported[key], value), key
        assert exported[key].is_contiguous()
    # The optimizer state is exported in the official order as well.
    for p, entry in zip(model.parameters(), raw["optimizer_state_dict"]["state"].values()):
        buf = opt.state[p]["momentum_buffer"]
        assert torch.equal(entry["momentum_buffer"], buf.permute(0, 1, 4, 3, 2) if buf.dim() == 5 else buf)
    # The reference forward on the exported file still matches the loaded model.
    x = official_cube()
    with torch.no_grad():
        torch.testing.assert_close(reference_forward(exported, x), to_zyx(model.eval()(to_zyx(x))),
                                   atol=1e-5, rtol=1e-4)
    # load -> save -> load is the identity.
    again = load_official_genesis(out)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_native_layout_files_are_not_permuted(tmp_path):
    torch.manual_seed(0)
    net = UNet3D(base_channels=BASE).eval()
    save_official_layout(net, tmp_path / "native.pt", axes="zyx")
    raw = torch.load(tmp_path / "native.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(raw["module.down_tr64.ops.0.conv1.weight"], net.down_tr64.ops[0].conv1.weight)
    loaded = load_official_genesis(tmp_path / "native.pt", axes="zyx").eval()
    x = torch.randn(2, 1, 16, 24, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    with pytest.raises(ValueError, match="axes='yxz'"):
        load_official_genesis(tmp_path / "native.pt", axes="yxz")
    with pytest.raises(ValueError, match="axes"):
        save_official_layout(net, tmp_path / "bad.pt", axes="xzy")


def test_state_dict_reader_and_classifier_get_our_order(official_file):
    path, sd = official_file
    state = read_official_state_dict(path)
    assert torch.equal(state["down_tr128.ops.1.conv1.weight"],
                       sd["down_tr128.ops.1.conv1.weight"].permute(0, 1, 4, 3, 2))
    as_stored = read_official_state_dict(path, axes="zyx")
    assert all(torch.equal(as_stored[k], v) for k, v in sd.items())
    assert all(torch.equal(v, sd[k]) for k, v in convert_kernel_axes(state, "zyx", "xyz").items())
    clf = UNet3DClassifier(n_outputs=1, base_channels=BASE)
    clf.load_encoder_from(state)
    assert torch.equal(clf.down_tr64.ops[0].conv1.weight, state["down_tr64.ops.0.conv1.weight"])
