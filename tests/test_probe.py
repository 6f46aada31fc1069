from types import SimpleNamespace

import numpy as np
import pytest
import torch

from purenn.analysis.probe import compare_probes, extract_features, fit_probe
from purenn.errors import ConfigError, DataError, LayerError


class FakeSession:
    """Duck-typed ONNX Runtime session whose ``pure.layer4`` output is computed by a PurifiedModel."""

    def __init__(self, pm):
        self.pm, self.calls = pm, 0

    def get_inputs(self):
        return [SimpleNamespace(name="input")]

    def get_outputs(self):
        return [SimpleNamespace(name="logits"), SimpleNamespace(name="pure.layer4")]

    def run(self, names, feeds):
        assert names == ["pure.layer4"] and isinstance(feeds["input"], np.ndarray)
        assert feeds["input"].dtype == np.float32
        self.calls += 1
        with torch.no_grad():
            return [self.pm.pure_features(torch.from_numpy(feeds["input"]))["layer4"].numpy()]


def test_fit_probe_known_structure():
    rng = np.random.default_rng(0)
    y = np.arange(400) % 4
    # the label is in the sign pattern of two features: separable only with both of them
    x = rng.normal(0, 0.3, (400, 6))
    x[:, 0] += np.where(y % 2, 2, -2)
    x[:, 1] += np.where(y // 2, 2, -2)
    both = fit_probe(x[:200], y[:200], x[200:], y[200:])
    one = fit_probe(x[:200, [0, 2, 3]], y[:200], x[200:, [0, 2, 3]], y[200:])
    assert both.accuracy > 0.97 and 0.4 < one.accuracy < 0.6
    assert both.n_features == 6 and set(both.per_class) == {0, 1, 2, 3}
    assert np.mean(list(both.per_class.values())) == pytest.approx(both.accuracy, abs=0.02)


def test_fit_probe_errors():
    x, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with pytest.raises(DataError, match="same width"):
        fit_probe(x, y, np.zeros((4, 3)), y)
    with pytest.raises(DataError, match="labels"):
        fit_probe(x, y[:3], x, y)
    with pytest.raises(DataError, match="single class"):
        fit_probe(x, np.zeros(4, int), x, y)
    with pytest.raises(DataError, match="NaN"):
        fit_probe(np.full((4, 2), np.nan), y, x, y)
    with pytest.raises(ConfigError, match="C must"):
        fit_probe(x, y, x, y, C=0)


def test_extract_features_torch(planted_pm, planted_model):
    model, _, test = planted_model
    x = test.images[:20]
    pure = extract_features(planted_pm, x, layer="layer4", batch_size=7)
    with torch.no_grad():
        np.testing.assert_allclose(pure, planted_pm.pure_features(x)["layer4"].numpy(), rtol=1e-5, atol=1e-6)
        a = model.layer4(model.layer3(model.layer2(model.layer1(model.relu(model.bn1(model.conv1(x)))))))
    orig = extract_features(planted_pm, test.subset(range(20)), layer="layer4", kind="original")
    np.testing.assert_allclose(orig, a.mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    # the channel sums of the pure features are the original features
    vc = planted_pm.pure_layer("layer4").v_channel.numpy()
    merged = np.zeros_like(orig)
    np.add.at(merged, (slice(None), vc), pure)
    np.testing.assert_allclose(merged, orig, rtol=1e-5, atol=1e-6)
    mx = extract_features(planted_pm, x.numpy(), layer="layer4", kind="original", pool="max")
    np.testing.assert_allclose(mx, a.amax(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)


def test_extract_features_onnx_session(planted_pm, planted_model):
    _, _, test = planted_model
    x = test.images[:10]
    sess = FakeSession(planted_pm)
    pure = extract_features(sess, x.numpy(), layer="layer4", batch_size=4)
    assert sess.calls == 3
    np.testing.assert_allclose(pure, extract_features(planted_pm, x, layer="layer4"), rtol=1e-6)
    vc = planted_pm.pure_layer("layer4").v_channel.tolist()
    orig = extract_features(sess, test.subset(range(10)), layer="layer4", kind="original", virtual_channels=vc)
    np.testing.assert_allclose(orig, extract_features(planted_pm, x, layer="layer4", kind="original"),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="virtual_channels"):
        extract_features(sess, x.numpy(), layer="layer4", kind="original")
    with pytest.raises(ConfigError, match="has 3"):
        extract_features(sess, x.numpy(), layer="layer4", kind="original", virtual_channels=[0, 1, 2])
    with pytest.raises(ConfigError, match="no output 'pure.layer3'"):
        extract_features(sess, x.numpy(), layer="layer3")


def test_extract_features_errors(planted_pm):
    x = torch.rand(2, 1, 16, 16)
    with pytest.raises(ConfigError, match="kind"):
        extract_features(planted_pm, x, layer="layer4", kind="both")
    with pytest.raises(ConfigError, match="pool"):
        extract_features(planted_pm, x, layer="layer4", pool=None)
    with pytest.raises(ConfigError, match="batch_size"):
        extract_features(planted_pm, x, layer="layer4", batch_size=0)
    with pytest.raises(LayerError):
        extract_features(planted_pm, x, layer="layer3")
    with pytest.raises(ConfigError, match="PurifiedModel"):
        extract_features(torch.nn.Linear(2, 2), x, layer="layer4")
    with pytest.raises(DataError):
        extract_features(FakeSession(planted_pm), np.zeros((2, 16, 16), np.float32), layer="layer4")


def test_compare_probes_on_planted_concepts(planted_pm, planted_model):
    _, train, test = planted_model
    cmp = compare_probes(planted_pm, train.head(160), train.fine[:160], test, test.fine, layer="layer4")
    v = planted_pm.pure_layer("layer4").n_virtual
    assert cmp.original.n_features == 512 and cmp.pure.n_features == v
    # fine labels are linearly readable from layer4 of a model trained on superclasses only
    assert cmp.original.accuracy > 0.6 and cmp.pure.accuracy > 0.6
    assert cmp.gain == pytest.approx(cmp.pure.accuracy - cmp.original.accuracy)


def test_progress_bars_name_each_feature_pass(planted_model, planted_pm, capsys):
    _, train, test = planted_model
    compare_probes(planted_pm, train, train.fine.numpy(), test, test.fine.numpy(), layer="layer4", progress=True)
    err = capsys.readouterr().err
    for desc in ("pure features, train", "pure features, test", "channels, train", "channels, test"):
        assert desc in err, desc
    extract_features(planted_pm, test, layer="layer4")  # quiet by default
    assert capsys.readouterr().err == ""
