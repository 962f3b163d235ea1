"""Training methods named for what they compute: ``pca_diff_unit`` reproduces repeng's
``ControlVector.train`` on the embedded model; ``svd_diff`` is the old ``pca_diff``;
``read="reply"`` takes the direction from reply states and the length from the last token."""
from __future__ import annotations

import inspect

import pytest
import torch

from max_jupyter.errors import BadArgumentError
from max_jupyter.steering import train_vector
from max_jupyter.steering.training import METHODS, pca_diff_unit, read_reply_states, svd_diff
from repeng_support import hf_copy, repeng  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow  # the embedded model (against repeng)

POSITIVE = ["I love this, it is wonderful!", "Great joy and happiness.",
            "What a delightful day.", "I feel fantastic today."]
NEGATIVE = ["I hate this, it is terrible.", "Awful misery and sadness.",
            "What a miserable day.", "I feel awful today."]
LAYERS = [3, 12, 20]  # not the last layer: repeng reads it after the final norm (HF's quirk)


def test_pca_diff_unit_equals_repeng_training(engine, repeng, hf_copy):
    model, tokenizer = hf_copy
    dataset = [repeng.DatasetEntry(p, n) for p, n in zip(POSITIVE, NEGATIVE)]
    theirs = repeng.ControlVector.train(model, tokenizer, dataset, hidden_layers=LAYERS,
                                        batch_size=1)
    ours = train_vector(engine, POSITIVE, NEGATIVE, layers=LAYERS, method="pca_diff_unit")
    assert ours.layers == tuple(sorted(theirs.directions))
    for layer in LAYERS:
        expected = torch.from_numpy(theirs.directions[layer])
        torch.testing.assert_close(ours.directions[layer], expected, atol=2e-6, rtol=0)


def test_pca_diff_unit_centres_normalises_and_votes():
    """Diffs = a shared offset + spread along ``axis``: the centred principal direction is
    ``axis`` (the uncentred SVD finds the offset), unit norm, pointed the way most pairs
    project positive: repeng's vote, not the mean projection (two large pairs point the
    other way and outweigh the rest in the mean)."""
    g = torch.Generator().manual_seed(0)
    hidden = 32
    offset, axis = torch.zeros(hidden), torch.zeros(hidden)
    offset[0], axis[1] = 10.0, 1.0
    along = torch.tensor([-1.0, -1.2, -0.8, -1.1, 6.0, 5.0])  # 4 of 6 pairs negative along axis
    diffs = offset + along[:, None] * axis + 0.01 * torch.randn(6, hidden, generator=g)
    unit = pca_diff_unit(diffs)
    assert unit.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert unit[1].item() == pytest.approx(-1.0, abs=1e-3)  # -axis: the majority vote wins
    assert float(along.mean()) > 0  # while the mean projection would have chosen +axis
    assert abs(float(svd_diff(diffs)[0])) > 1.0  # the uncentred method finds the offset instead
    assert ((diffs @ unit) > 0).sum() > ((diffs @ unit) < 0).sum()
    torch.testing.assert_close(pca_diff_unit(-diffs), -unit)  # swapping every pair flips it


def test_pca_diff_is_the_old_name_of_svd_diff(engine):
    with pytest.warns(DeprecationWarning, match="now called 'svd_diff'.*'pca_diff_unit'"):
        old = train_vector(engine, POSITIVE[:3], NEGATIVE[:3], layers=[12], method="pca_diff")
    new = train_vector(engine, POSITIVE[:3], NEGATIVE[:3], layers=[12], method="svd_diff")
    assert torch.equal(old.directions[12], new.directions[12])
    assert inspect.signature(train_vector).parameters["method"].default == "svd_diff"


def test_method_errors(engine):
    with pytest.raises(BadArgumentError, match="method='ica' is unknown.*mean_diff.*pca_diff_unit.*svd_diff"):
        train_vector(engine, ["a"], ["b"], method="ica")
    with pytest.raises(BadArgumentError, match="one pair.*at least two pairs"):
        train_vector(engine, ["a"], ["b"], method="pca_diff_unit")
    assert sorted(METHODS) == ["mean_diff", "pca_diff_unit", "svd_diff"]
    with pytest.raises(BadArgumentError, match="read='middle' is unknown.*'last_token', 'reply'"):
        train_vector(engine, ["a"], ["b"], read="middle")


@pytest.mark.parametrize("method", ["svd_diff", "mean_diff"])
def test_read_reply_takes_the_reply_direction_at_the_last_token_length(engine, method):
    counts = []
    reply = train_vector(engine, POSITIVE, NEGATIVE, layers=LAYERS, method=method, read="reply",
                         progress=lambda n, total: counts.append((n, total)))
    last = train_vector(engine, POSITIVE, NEGATIVE, layers=LAYERS, method=method)
    texts = 2 * len(POSITIVE)
    assert counts == [(n, 2 * texts) for n in range(1, 2 * texts + 1)]  # both readings, one count
    states = read_reply_states(engine, POSITIVE + NEGATIVE, LAYERS)
    diffs = states[:len(POSITIVE)] - states[len(POSITIVE):]
    for j, layer in enumerate(LAYERS):
        along = METHODS[method](diffs[:, j])
        expected = along / along.norm() * last.directions[layer].norm()
        torch.testing.assert_close(reply.directions[layer], expected)
        assert float(torch.cosine_similarity(reply.directions[layer], last.directions[layer], 0)) < 0.95
