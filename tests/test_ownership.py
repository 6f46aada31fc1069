"""purenn never changes what it was given: the caller's model (weights, mode, dtype, device), a
skeleton given to a failing load; and suppression handles undo exactly their own suppression."""

from __future__ import annotations

import threading

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import purenn
from purenn.errors import ConfigError, FileFormatError, UnsupportedModelError

from conftest import tiny_resnet

NEURONS = {"layer3": [0, 3, 6, 9], "layer4.1": [1, 2, 5]}


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """Copies of every tensor (values, dtype, device) and the mode of every submodule."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def assert_unchanged(model: nn.Module, snap: tuple[dict[str, torch.Tensor], list[bool]]) -> None:
    state, modes = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and now[k].device == v.device, k
        assert torch.equal(now[k], v), k
    assert [m.training for m in model.modules()] == modes


def purify(model: nn.Module, **kwargs) -> purenn.PurifiedModel:
    return purenn.purify_model(model, list(NEURONS), images(12, seed=1), n_refs=4, neurons=NEURONS,
                               progress=False, **kwargs)


def outputs(pm: purenn.PurifiedModel, x: torch.Tensor):
    with torch.no_grad():
        return pm(x), pm.gates(x), pm.pure_features(x)


def assert_same_outputs(a, b) -> None:
    assert torch.equal(a[0], b[0])
    for i in (1, 2):
        assert a[i].keys() == b[i].keys() and all(torch.equal(a[i][k], b[i][k]) for k in a[i])


@pytest.fixture(scope="module")
def shared():
    """A model in eval mode and its purified model; tests put both back as they found them."""
    model = tiny_resnet()
    return model, purify(model)


# ------------------------------------------------------------------------------------------ purify_model


def test_purify_leaves_a_training_mode_model_as_it_was():
    model = tiny_resnet().train()
    snap = snapshot(model)
    pm = purify(model)
    assert_unchanged(model, snap)  # mode (every submodule), weights and BatchNorm statistics
    assert pm.base_model is model and not pm.training
    x = images(3, seed=2)
    got = outputs(pm, x)
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(got[0], model.eval()(x))  # the logits of the model in inference form


@pytest.mark.parametrize("device, message", [
    ("meta", "holds no data"),
    ("nonsense", "device must be"),
    (42.5, "device must be"),
    ("cuda:97", "cuda"),
])
def test_purify_refuses_devices_without_touching_the_model(device, message):
    model = tiny_resnet()
    snap = snapshot(model)
    with pytest.raises(ConfigError, match=message):
        purify(model, device=device)
    assert_unchanged(model, snap)


def test_purify_on_the_models_device_shares_it():
    model = tiny_resnet()
    pm = purify(model, device="cpu")
    assert pm.base_model is model and pm.unload() is model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_purify_on_another_device_works_on_a_copy():
    model = tiny_resnet()
    snap = snapshot(model)
    pm = purify(model, device="cuda")
    assert_unchanged(model, snap)  # still on the CPU
    assert pm.base_model is not model and pm.base_model.conv1.weight.is_cuda
    x = images(3, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(pm(x.cuda()).cpu(), model(x), rtol=1e-4, atol=1e-4)


def test_check_forward_puts_the_mode_back_when_it_refuses():
    class Custom(torchvision.models.ResNet):
        def forward(self, x):
            return super().forward(x) * 2

    custom = Custom(torchvision.models.resnet.BasicBlock, [1, 2, 1, 2], num_classes=3)
    custom.load_state_dict(tiny_resnet().state_dict())
    custom.train()
    snap = snapshot(custom)
    with pytest.raises(UnsupportedModelError, match="customised forward"):
        purify(custom)
    assert_unchanged(custom, snap)


# ------------------------------------------------------------------------------------------ the shared model's mode


def test_training_mode_of_the_shared_model_changes_nothing(shared):
    model, pm = shared
    x = images(4, seed=3)
    before = outputs(pm, x)
    model.train()
    try:
        snap = snapshot(model)
        assert_same_outputs(outputs(pm, x), before)  # same logits, gates and pure features
        assert_unchanged(model, snap)  # BatchNorm running statistics not overwritten, still training
        assert not pm.training
    finally:
        model.eval()


def test_eval_of_the_purified_model_leaves_the_base_mode(shared):
    model, pm = shared
    model.train()
    try:
        snap = snapshot(model)
        assert pm.eval() is pm and pm.train(False) is pm
        assert_unchanged(model, snap)
        with pytest.raises(ConfigError, match="inference-only"):
            pm.train()
        assert_unchanged(model, snap)
    finally:
        model.eval()


# ------------------------------------------------------------------------------------------ conversions of pm


@pytest.mark.parametrize("convert", [
    lambda pm: pm.double(),
    lambda pm: pm.half(),
    lambda pm: pm.bfloat16(),
    lambda pm: pm.to(torch.float64),
    lambda pm: pm.to(dtype=torch.float16),
    lambda pm: pm.to("meta"),
    lambda pm: pm.to_empty(device="cpu"),
])
def test_conversions_of_pm_convert_a_private_copy(convert):
    model = tiny_resnet()
    pm = purify(model)
    snap = snapshot(model)
    out = convert(pm)
    assert out is pm
    assert_unchanged(model, snap)
    assert pm.base_model is not model and pm.unload() is pm.base_model
    ref = pm.pure_layer("layer3").centroids
    assert pm.base_model.conv1.weight.dtype == ref.dtype and pm.base_model.conv1.weight.device == ref.device
    assert shares_no_storage(model, pm.base_model)


def shares_no_storage(a: nn.Module, b: nn.Module) -> bool:
    def ptrs(m):
        return {t.data_ptr() for t in (*m.parameters(), *m.buffers()) if t.numel() and t.device.type != "meta"}

    return not ptrs(a) & ptrs(b)


def test_double_pm_computes_in_double_and_copies_once():
    model = tiny_resnet()
    pm = purify(model)
    x = images(3, seed=4)
    with torch.no_grad():
        before = pm(x)
    pm.double()
    copy = pm.base_model
    assert model.conv1.weight.dtype == torch.float32 and copy.conv1.weight.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(pm(x.double()).float(), before, rtol=1e-4, atol=1e-5)
    pm.float()
    assert pm.base_model is copy  # purenn's own copy is converted in place from now on
    with torch.no_grad():
        torch.testing.assert_close(pm(x), before, rtol=1e-4, atol=1e-5)


def test_conversions_that_change_nothing_do_not_copy(shared):
    model, pm = shared
    for convert in (lambda: pm.float(), lambda: pm.to("cpu"), lambda: pm.cpu(), lambda: pm.to(torch.float32)):
        assert convert() is pm and pm.base_model is model


def test_converting_the_shared_model_afterwards_is_refused():
    model = tiny_resnet()
    pm = purify(model)
    x = images(2, seed=5)
    model.double()
    with pytest.raises(ConfigError, match="converted after purification"):
        pm(x.double())
    with pytest.raises(ConfigError, match="converted after purification"):
        pm.gates(x.double())
    pm.double()  # converting pm to match makes it consistent again, without another copy
    assert pm.base_model is model
    with torch.no_grad():
        torch.testing.assert_close(pm(x.double()), model(x.double()))


# ------------------------------------------------------------------------------------------ suppression handles


def weights(pm, layer="layer3"):
    return pm.pure_layer(layer).merge_weight.clone()


def test_handles_removed_out_of_order_restore_everything(shared):
    _, pm = shared
    x = images(3, seed=6)
    with torch.no_grad():
        plain = pm(x)
    w0 = weights(pm)
    a, b = pm.virtual_index("layer3", 3, 0), pm.virtual_index("layer3", 3, 1)
    h1 = pm.suppress("layer3", [a])
    h2 = pm.suppress("layer3", [a, b])
    assert h1.active and h2.active
    h1.remove()  # the first one first: a stays suppressed, h2 still holds it
    w = weights(pm)
    assert w[a] == 0 and w[b] == 0 and not h1.active
    h2.remove()
    assert torch.equal(weights(pm), w0)
    with torch.no_grad():
        assert torch.equal(pm(x), plain)
    h1.remove()
    h2.remove()  # removing twice does nothing
    assert torch.equal(weights(pm), w0)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2), (1, 2, 0), (0, 2, 1), (2, 0, 1)])
def test_every_removal_order_of_overlapping_handles(shared, order):
    _, pm = shared
    w0 = weights(pm)
    groups = [[0, 1, 2], [2, 3], [1, 3, 7]]
    handles = [pm.suppress("layer3", g) for g in groups]
    held = set(range(3))
    for i in order:
        handles[i].remove()
        held.discard(i)
        off = {v for j in held for v in groups[j]}
        w = weights(pm)
        assert all((w[v] == 0) == (v in off) for v in range(len(w)))
    assert torch.equal(weights(pm), w0)


def test_nested_with_blocks_and_restore(shared):
    _, pm = shared
    w0 = weights(pm)
    with pm.suppress("layer3", [1]):
        with pm.suppress("layer3", [1, 2]):
            assert weights(pm)[[1, 2]].eq(0).all()
        assert weights(pm)[1] == 0 and weights(pm)[2] == 1
    assert torch.equal(weights(pm), w0)
    old = pm.suppress("layer3", [4])
    pm.restore("layer3")  # ends every suppression; the old handle then does nothing
    assert torch.equal(weights(pm), w0) and not old.active
    new = pm.suppress("layer3", [4])
    old.remove()
    assert weights(pm)[4] == 0  # still held by the new handle
    new.remove()
    assert torch.equal(weights(pm), w0)


def test_a_suppression_from_the_file_survives_a_handle(shared, tmp_path):
    _, pm = shared
    v = pm.virtual_index("layer3", 0, 1)
    with pm.suppress("layer3", [v]):
        path = pm.save(tmp_path / "s.safetensors")
    pm2 = purenn.load_purified(path)
    assert weights(pm2)[v] == 0
    h = pm2.suppress("layer3", [v, v + 1])
    h.remove()
    assert weights(pm2)[v] == 0 and weights(pm2)[v + 1] == 1
    pm2.restore()
    assert weights(pm2).eq(1).all()


def test_handles_from_several_threads(shared):
    _, pm = shared
    w0 = weights(pm)
    errors = []

    def work(i):
        try:
            for _ in range(50):
                h = pm.suppress("layer3", [i % 3, 5])
                h.remove()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and torch.equal(weights(pm), w0)


# ------------------------------------------------------------------------------------------ load into a skeleton


def _edit(path, out, key, fn):
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    tensors[key] = fn(tensors[key].clone())
    save_file(tensors, str(out), metadata=metadata)
    return out


def _nan_centroid(t):
    t.view(-1)[0] = float("nan")
    return t


def _bigger(t):
    return t * 1.0001


@pytest.mark.parametrize("key, fn, message", [
    ("purenn.layer3.centroids", _nan_centroid, "centroids' .* NaN"),
    ("base_model.layer2.0.conv1.weight", _bigger, "differs from what was saved"),
    ("purenn.layer4.1.merge_weight", lambda t: t * 7.5, "7.5"),
])
def test_failed_load_leaves_the_skeleton_untouched(shared, tmp_path, key, fn, message):
    _, pm = shared
    path = pm.save(tmp_path / "good.safetensors")
    bad = _edit(path, tmp_path / "bad.safetensors", key, fn)
    skeleton = tiny_resnet(seed=9, dtype=torch.float64).train()  # another dtype: a cast would show
    snap = snapshot(skeleton)
    with pytest.raises(FileFormatError, match=message):
        purenn.load_purified(bad, model=skeleton)
    assert_unchanged(skeleton, snap)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "good.safetensors"]


def test_load_into_a_skeleton_keeps_its_mode(shared, tmp_path):
    model, pm = shared
    path = pm.save(tmp_path / "good.safetensors")
    skeleton = tiny_resnet(seed=9).train()
    pm2 = purenn.load_purified(path, model=skeleton)
    assert pm2.base_model is skeleton and all(m.training for m in skeleton.modules())
    x = images(3, seed=7)
    assert_same_outputs(outputs(pm2, x), outputs(pm, x))


def test_load_with_a_bad_device_touches_nothing(shared, tmp_path):
    _, pm = shared
    path = pm.save(tmp_path / "good.safetensors")
    skeleton = tiny_resnet(seed=9)
    snap = snapshot(skeleton)
    with pytest.raises(ConfigError, match="holds no data"):
        purenn.load_purified(path, model=skeleton, device="meta")
    assert_unchanged(skeleton, snap)
