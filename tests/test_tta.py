"""train.tta: the 8 dihedral views, and probabilities averaged over them."""
import pytest
import torch
from torch import nn

from train.engine.loop import Precision
from train.evaluation.tta import dihedral_views, tta_probs

CPU = torch.device("cpu")


def _key(t: torch.Tensor) -> tuple:
    return tuple(t.flatten().tolist())


def test_the_views_are_the_8_distinct_symmetries_of_the_square_and_a_closed_set():
    s = 5
    index = torch.arange(s * s).view(1, 1, s, s)  # every pixel its own value: a view is a permutation of them
    views = dihedral_views(index)
    assert len(views) == 8
    keys = {_key(v) for v in views}
    assert len(keys) == 8  # 8 distinct permutations
    for v in views:
        assert sorted(_key(v)) == list(range(s * s))  # a permutation: nothing resampled or lost
    assert _key(views[0]) == _key(index)  # the identity comes first
    for v in views:  # closure: any view of any view is one of the 8
        assert {_key(w) for w in dihedral_views(v)} == keys
    # the named elements: a quarter turn counter-clockwise, and the horizontal flip of the identity
    assert torch.equal(views[1][0, 0], torch.rot90(index[0, 0]))
    assert torch.equal(views[4][0, 0], index[0, 0].flip(-1))


def test_views_keep_batch_and_channels_apart():
    x = torch.randn(3, 2, 4, 4)
    for v in dihedral_views(x):
        assert v.shape == x.shape
        for i in range(3):  # each image and channel is moved as a whole, never mixed with another
            assert torch.allclose(torch.sort(v[i, 1].flatten()).values, torch.sort(x[i, 1].flatten()).values)


def test_non_square_batches_are_refused():
    with pytest.raises(ValueError, match="square"):
        dihedral_views(torch.zeros(1, 3, 4, 5))


class Net(nn.Module):
    """A small CNN with no symmetry of its own: a 3x3 conv, then a linear layer over every position."""

    def __init__(self, s: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * s * s, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Symmetrised(nn.Module):
    """Net averaged over the 8 views of its input by construction: invariant to each of them (group closure)."""

    def __init__(self, s: int = 6):
        super().__init__()
        self.net = Net(s)

    def forward(self, x):
        return torch.stack([self.net(v) for v in dihedral_views(x)]).mean(0)


class PointwisePooled(nn.Module):
    """A 1x1 conv then global average pooling: invariant to any permutation of pixels, independently of
    dihedral_views."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _plain_probs(model, x):
    with torch.no_grad():
        return torch.softmax(model(x).float(), 1)


@pytest.mark.parametrize("make", [Symmetrised, PointwisePooled])
def test_an_invariant_model_gives_the_same_probabilities_with_and_without_tta(make):
    x = torch.randn(5, 3, 6, 6) * 3
    model = make().eval()
    tta = tta_probs(model, x, Precision(channels_last=True), CPU)
    assert tta.shape == (5, 2) and tta.dtype == torch.float32
    assert torch.allclose(tta, _plain_probs(model, x), atol=1e-6, rtol=0)
    assert torch.allclose(tta.sum(1), torch.ones(5), atol=1e-6)


def test_a_model_without_the_symmetry_gives_other_probabilities():
    x = torch.randn(5, 3, 6, 6) * 3
    model = Net().eval()
    tta = tta_probs(model, x, Precision(), CPU)
    plain = _plain_probs(model, x)
    assert (tta - plain).abs().max() > 1e-3
    # and it is the mean of the 8 views' probabilities, each computed on its own
    each = torch.stack([_plain_probs(model, v) for v in dihedral_views(x)]).mean(0)
    assert torch.allclose(tta, each, atol=1e-6, rtol=0)


def test_the_wrapped_model_gives_the_tta_mean_through_a_softmax():
    """DihedralTTA (what train.evaluate --tta runs through predict) equals tta_probs after predict's softmax."""
    from train.engine.loop import Precision
    from train.evaluation.tta import DihedralTTA, tta_probs
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)).eval()
    x = torch.randn(5, 3, 8, 8)
    model(x)  # materialise the lazy layer
    expected = tta_probs(model, x, Precision(), torch.device("cpu"))
    got = torch.softmax(DihedralTTA(model).eval()(x), 1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(got, torch.softmax(model(x), 1), atol=1e-3)  # not the plain result
