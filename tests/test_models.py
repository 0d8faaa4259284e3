"""Tests for pipeline.models: shape tables, bad inputs, the reference parameter count,
the official checkpoint layout against an independent functional forward, and the
batch-statistics norm."""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.model_io.official import load_official_genesis, read_official_state_dict, save_official_layout
from pipeline.model_io.state_dicts import CheckpointError, CheckpointMismatchError
from pipeline.models import REFERENCE_PARAMETER_COUNT
from pipeline.models.classifier import UNet3DClassifier
from pipeline.models.norms import ContBatchNorm3d
from pipeline.models.unet3d import UNet3D, count_trainable_parameters

ENCODER = ("down_tr64", "down_tr128", "down_tr256", "down_tr512")
DECODER = ("up_tr256", "up_tr128", "up_tr64")


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm random affine parameters and running statistics, so that a
    checkpoint test cannot pass with default (identity) norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("bn1.weight") or name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("bn1.bias") or name.endswith("running_mean"):
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                t.fill_(7)
    return model


def functional_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The reference U-Net written with torch.nn.functional only, from a state dict."""

    def luconv(prefix: str, h: torch.Tensor) -> torch.Tensor:
        h = F.conv3d(h, sd[f"{prefix}.conv1.weight"], sd[f"{prefix}.conv1.bias"], padding=1)
        h = F.batch_norm(h, None, None, sd[f"{prefix}.bn1.weight"], sd[f"{prefix}.bn1.bias"],
                         training=True, momentum=0.1, eps=1e-5)
        return F.relu(h)

    skips = []
    for depth, name in enumerate(ENCODER):
        x = luconv(f"{name}.ops.1", luconv(f"{name}.ops.0", x))
        if depth < 3:
            skips.append(x)
            x = F.max_pool3d(x, 2)
    for name in DECODER:
        x = F.conv_transpose3d(x, sd[f"{name}.up_conv.weight"], sd[f"{name}.up_conv.bias"], stride=2)
        x = torch.cat((x, skips.pop()), dim=1)
        x = luconv(f"{name}.ops.1", luconv(f"{name}.ops.0", x))
    return torch.sigmoid(F.conv3d(x, sd["out_tr.final_conv.weight"], sd["out_tr.final_conv.bias"]))


# ---------------------------------------------------------------- shapes

UNET_CASES = [
    (dict(base_channels=4), (2, 1, 16, 16, 16), (2, 1, 16, 16, 16)),
    (dict(base_channels=4, norm="batch", out_channels=3), (1, 1, 32, 64, 64), (1, 3, 32, 64, 64)),
    (dict(base_channels=2, norm="instance"), (1, 1, 64, 64, 64), (1, 1, 64, 64, 64)),
    (dict(base_channels=8, in_channels=2), (2, 2, 16, 24, 32), (2, 1, 16, 24, 32)),
    (dict(base_channels=4, norm="instance", out_channels=2, sigmoid=False), (2, 1, 16, 16, 16),
     (2, 2, 16, 16, 16)),
    (dict(base_channels=32), (1, 1, 16, 16, 16), (1, 1, 16, 16, 16)),
]


@pytest.mark.parametrize("kwargs,in_shape,out_shape", UNET_CASES)
def test_unet_shapes(kwargs, in_shape, out_shape):
    torch.manual_seed(0)
    net = UNet3D(**kwargs)
    for mode in (net.train, net.eval):
        mode()
        with torch.no_grad():
            y = net(torch.randn(in_shape))
        assert y.shape == out_shape
        if kwargs.get("sigmoid", True):
            assert 0.0 <= y.min() and y.max() <= 1.0


CLASSIFIER_CASES = [
    (dict(n_outputs=1, base_channels=4), (2, 1, 16, 16, 16), (2, 1)),
    (dict(n_outputs=3, base_channels=4, norm="batch"), (3, 1, 32, 32, 32), (3, 3)),
    (dict(n_outputs=2, base_channels=2, norm="instance", hidden=16), (1, 1, 64, 64, 64), (1, 2)),
    (dict(n_outputs=1, base_channels=4, in_channels=2), (2, 2, 16, 24, 32), (2, 1)),
]


@pytest.mark.parametrize("kwargs,in_shape,out_shape", CLASSIFIER_CASES)
def test_classifier_shapes(kwargs, in_shape, out_shape):
    torch.manual_seed(0)
    net = UNet3DClassifier(**kwargs).eval()
    with torch.no_grad():
        assert net(torch.randn(in_shape)).shape == out_shape


def test_reference_parameter_count_and_names():
    net = UNet3D()
    assert count_trainable_parameters(net) == REFERENCE_PARAMETER_COUNT == 19_073_665
    sd = net.state_dict()
    assert len(sd) == 106
    expected_shapes = {
        "down_tr64.ops.0.conv1.weight": (32, 1, 3, 3, 3),
        "down_tr64.ops.1.conv1.weight": (64, 32, 3, 3, 3),
        "down_tr512.ops.0.conv1.weight": (256, 256, 3, 3, 3),
        "down_tr512.ops.1.conv1.weight": (512, 256, 3, 3, 3),
        "down_tr512.ops.1.bn1.running_var": (512,),
        "up_tr256.up_conv.weight": (512, 512, 2, 2, 2),
        "up_tr256.ops.0.conv1.weight": (256, 768, 3, 3, 3),
        "up_tr128.up_conv.weight": (256, 256, 2, 2, 2),
        "up_tr128.ops.0.conv1.weight": (128, 384, 3, 3, 3),
        "up_tr64.up_conv.weight": (128, 128, 2, 2, 2),
        "up_tr64.ops.0.conv1.weight": (64, 192, 3, 3, 3),
        "up_tr64.ops.1.bn1.num_batches_tracked": (),
        "out_tr.final_conv.weight": (1, 64, 1, 1, 1),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert isinstance(net.down_tr64.ops[0].bn1, ContBatchNorm3d)
    assert isinstance(net.down_tr64.maxpool, nn.MaxPool3d)
    # The classifier's encoder is the U-Net's, name for name.
    clf = UNet3DClassifier()
    assert set(net.encoder_state_dict()) == {k for k in clf.state_dict() if k.startswith("down_tr")}
    assert isinstance(UNet3D(norm="batch").down_tr64.ops[0].bn1, nn.BatchNorm3d)
    assert isinstance(UNet3D(norm="instance").down_tr64.ops[0].bn1, nn.InstanceNorm3d)


BAD_SHAPES = [
    ((1, 1, 20, 16, 16), "multiple of 8"),
    ((1, 1, 16, 16, 12), "multiple of 8"),
    ((1, 16, 16, 16), "5-D"),
    ((1, 2, 16, 16, 16), "channel"),
]


@pytest.mark.parametrize("shape,rule", BAD_SHAPES)
@pytest.mark.parametrize("cls", [UNet3D, UNet3DClassifier])
def test_bad_shapes_raise(cls, shape, rule):
    net = cls(base_channels=2)
    with pytest.raises(ValueError, match=rule) as err:
        net(torch.zeros(shape))
    assert str(shape) in str(err.value)


@pytest.mark.parametrize("kwargs,word", [
    (dict(norm="group"), "'group'"),
    (dict(base_channels=0), "base_channels"),
    (dict(in_channels=-1), "in_channels"),
])
def test_bad_settings_raise(kwargs, word):
    for cls in (UNet3D, UNet3DClassifier):
        with pytest.raises(ValueError, match=word):
            cls(**kwargs)


def test_logits_path_matches_sigmoid_output():
    torch.manual_seed(1)
    net = UNet3D(base_channels=4).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        logits = net.forward_logits(x)
        assert torch.allclose(torch.sigmoid(logits), net(x), atol=1e-6)
        raw = UNet3D(base_channels=4, sigmoid=False)
        raw.load_state_dict(net.state_dict())
        assert torch.allclose(raw.eval()(x), logits, atol=1e-6)


# ---------------------------------------------------------------- batch statistics norm

def test_cont_batchnorm_uses_batch_statistics_in_eval():
    torch.manual_seed(0)
    cont, standard = ContBatchNorm3d(3), nn.BatchNorm3d(3)
    standard.load_state_dict(cont.state_dict())
    for _ in range(3):  # a few training updates of the running statistics
        batch = 3.0 + 2.0 * torch.randn(4, 3, 4, 4, 4)
        cont(batch), standard(batch)
    assert torch.allclose(cont.running_mean, standard.running_mean)
    assert torch.allclose(cont.running_var, standard.running_var)
    assert int(cont.num_batches_tracked) == int(standard.num_batches_tracked) == 3

    x = -1.0 + 0.5 * torch.randn(2, 3, 4, 4, 4)
    cont.eval(), standard.eval()
    running_before = cont.running_mean.clone()
    out_eval = cont(x)
    assert torch.equal(cont.running_mean, running_before)  # eval leaves buffers alone
    expected = F.batch_norm(x, None, None, cont.weight, cont.bias, training=True)
    assert torch.allclose(out_eval, expected, atol=1e-6)
    assert not torch.allclose(out_eval, standard(x), atol=1e-2)
    cont.train()
    assert torch.allclose(out_eval, cont(x), atol=1e-6)


def test_unet_batch_stats_eval_equals_train_output():
    torch.manual_seed(0)
    net = randomized(UNet3D(base_channels=4))
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        out_train = net.train()(x)
        out_eval = net.eval()(x)
    assert torch.allclose(out_train, out_eval, atol=1e-6)


# ---------------------------------------------------------------- official checkpoint

def official_layout_file(path: pathlib.Path, net: nn.Module, epoch: int = 12) -> pathlib.Path:
    opt = torch.optim.SGD(net.parameters(), lr=1.0, momentum=0.9)
    save_official_layout(net, path, optimizer=opt, epoch=epoch)
    return path


def to_other_axes(t: torch.Tensor) -> torch.Tensor:
    """(.., x, y, z) <-> (.., z, y, x) on the three trailing axes of a 5-D tensor."""
    return t.permute(0, 1, 4, 3, 2)


def test_official_checkpoint_matches_functional_forward(tmp_path):
    """The file holds the kernels in the official (x, y, z) order; the functional forward
    runs on the file's tensors as stored and an (x, y, z) cube, our model on the same cube
    in (z, y, x) order (axis-order details: tests/test_official_axes.py)."""
    torch.manual_seed(0)
    net = randomized(UNet3D())  # reference width; a small input keeps it fast
    path = official_layout_file(tmp_path / "Genesis_Chest_CT.pt", net)

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"state_dict", "optimizer_state_dict", "epoch"} and raw["epoch"] == 12
    assert all(k.startswith("module.") for k in raw["state_dict"])
    sd = {k[len("module."):]: v for k, v in raw["state_dict"].items()}
    for key, value in net.state_dict().items():  # exported in the official axis order
        assert torch.equal(sd[key], to_other_axes(value) if value.dim() == 5 else value), key

    loaded = load_official_genesis(path).eval()
    assert loaded.base_channels == 32 and loaded.out_channels == 1
    for key, value in loaded.state_dict().items():  # load undoes save
        assert torch.equal(value, net.state_dict()[key]), key

    x = torch.randn(1, 1, 24, 16, 16)  # official (x, y, z) cube, x != z
    with torch.no_grad():
        got, want = to_other_axes(loaded(to_other_axes(x))), functional_forward(sd, x)
    assert want.std() > 1e-3  # not a saturated, trivially equal output
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("layout", ["official", "no_prefix", "bare", "no_num_batches_tracked"])
def test_checkpoint_layouts_and_inferred_settings(tmp_path, layout):
    """Every container layout; the tensors are written as our model holds them, (z, y, x),
    so they are read with axes="zyx" (and with the default "xyz" they are permuted)."""
    torch.manual_seed(0)
    net = randomized(UNet3D(base_channels=8, out_channels=2, in_channels=2)).eval()
    sd = net.state_dict()
    if layout == "no_num_batches_tracked":
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    content = {
        "official": {"state_dict": {f"module.{k}": v for k, v in sd.items()},
                     "optimizer_state_dict": {}, "epoch": 3},
        "no_prefix": {"state_dict": sd, "epoch": 3},
        "bare": sd,
        "no_num_batches_tracked": {"state_dict": sd},
    }[layout]
    torch.save(content, tmp_path / "w.pt")
    loaded = load_official_genesis(tmp_path / "w.pt", axes="zyx").eval()
    assert (loaded.base_channels, loaded.out_channels, loaded.in_channels) == (8, 2, 2)
    x = torch.randn(2, 2, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-6)
    permuted = load_official_genesis(tmp_path / "w.pt")
    assert torch.equal(permuted.down_tr64.ops[0].conv1.weight, to_other_axes(net.down_tr64.ops[0].conv1.weight))
    assert torch.equal(permuted.down_tr64.ops[0].conv1.bias, net.down_tr64.ops[0].conv1.bias)


def test_official_weights_into_other_norms(tmp_path):
    torch.manual_seed(0)
    net = randomized(UNet3D(base_channels=4))
    path = official_layout_file(tmp_path / "w.pt", net)
    inst = load_official_genesis(path, norm="instance")  # BatchNorm buffers ignored
    bn = load_official_genesis(path, model=UNet3D(base_channels=4, norm="batch"))
    for key, value in inst.state_dict().items():
        assert torch.equal(value, net.state_dict()[key])
    assert torch.equal(bn.down_tr64.ops[0].bn1.running_var, net.down_tr64.ops[0].bn1.running_var)


def _mismatched(sd: dict, kind: str) -> dict:
    sd = dict(sd)
    if kind == "missing":
        del sd["module.down_tr128.ops.0.conv1.bias"]
    elif kind == "extra":
        sd["module.extra_head.weight"] = torch.zeros(3)
    else:
        sd["module.up_tr64.ops.1.conv1.weight"] = torch.zeros(8, 7, 3, 3, 3)
    return sd


@pytest.mark.parametrize("kind,expected_text", [
    ("missing", ["missing keys (1): down_tr128.ops.0.conv1.bias"]),
    ("extra", ["unexpected keys (1): extra_head.weight"]),
    ("shape", ["up_tr64.ops.1.conv1.weight: expected [8, 8, 3, 3, 3] vs got [8, 7, 3, 3, 3]"]),
])
def test_mismatched_checkpoint_fails_clearly(tmp_path, kind, expected_text):
    net = UNet3D(base_channels=4)
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}
    path = tmp_path / f"broken_{kind}.pt"
    torch.save({"state_dict": _mismatched(sd, kind), "optimizer_state_dict": {}, "epoch": 1}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_genesis(path)
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert path.name in message
    for text in expected_text:
        assert text in message
    # A model of another width reports the shape differences.
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointMismatchError, match=r"expected \[8, 1, 3, 3, 3\] vs got \[4, 1, 3, 3, 3\]"):
        load_official_genesis(path, model=UNet3D(base_channels=8))


def _touch(path: str) -> None:  # what a malicious checkpoint would run on unpickling
    pathlib.Path(path).touch()


class _Payload:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    sd = {f"module.{k}": v for k, v in UNet3D(base_channels=2).state_dict().items()}
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": sd, "epoch": 1, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only") as err:
        load_official_genesis(path)
    assert "evil.pt" in str(err.value)
    assert not marker.exists()


def test_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_official_genesis(tmp_path / "nope.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt.*list"):
        load_official_genesis(tmp_path / "list.pt")
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match=r"meta\.pt.*no state dict"):
        load_official_genesis(tmp_path / "meta.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_official_genesis(tmp_path / "junk.pt")


# ---------------------------------------------------------------- encoder transfer

def test_classifier_loads_encoder_from_unet_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    unet = randomized(UNet3D(base_channels=4))
    clf = UNet3DClassifier(n_outputs=2, base_channels=4)
    head_before = clf.fc2.weight.clone()
    clf.load_encoder_from({f"module.{k}": v for k, v in unet.state_dict().items()})
    for key, value in unet.encoder_state_dict().items():
        assert torch.equal(clf.state_dict()[key], value), key
    assert torch.equal(clf.fc2.weight, head_before)

    # Same encoder output: the classifier's pooled bottleneck is the U-Net's.
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        bottleneck = unet.down_tr512(unet.down_tr256(unet.down_tr128(unet.down_tr64(x)[0])[0])[0])[0]
        pooled = bottleneck.mean(dim=(2, 3, 4))
        assert torch.allclose(clf(x), clf.fc2(F.relu(clf.fc1(pooled))), atol=1e-6)

    path = official_layout_file(tmp_path / "w.pt", unet)
    other = UNet3DClassifier(base_channels=4, norm="instance")
    other.load_encoder_from(read_official_state_dict(path))
    assert torch.equal(other.down_tr64.ops[0].conv1.weight, unet.down_tr64.ops[0].conv1.weight)

    with pytest.raises(CheckpointMismatchError, match="down_tr64.ops.0.conv1.weight: expected"):
        UNet3DClassifier(base_channels=8).load_encoder_from(unet)


def test_classifier_trains_with_bce_logits():
    torch.manual_seed(0)
    clf = UNet3DClassifier(n_outputs=1, base_channels=2, norm="batch", hidden=8)
    x, y = torch.randn(4, 1, 16, 16, 16), torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    loss = nn.BCEWithLogitsLoss()(clf(x), y)
    loss.backward()
    assert all(p.grad is not None for p in clf.parameters())
