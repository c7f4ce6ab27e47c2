"""Our LPIPS is the `lpips` package's LPIPS(net="vgg", version 0.1): the same distance on the same images with the
same VGG16 weights, from the learned weights in its wheel. (The package and torchvision are imported here only, to
compare with; the engine reads the wheel's weight file and runs its own VGG16.)"""

from __future__ import annotations

import warnings

import pytest
import torch

from engine.lpips import LAYERS, LPIPSError, load_lpips, weights_path
from engine.perceptual import RELU, load_vgg16

# Both sides run the same float32 operations in the same order (scaling, the same conv/ReLU/max-pool modules with the
# same weights, normalize_tensor, a 1x1 convolution, spatial mean, sum over layers), so they agree to rounding only:
# measured max relative difference 0 (bit-identical) at 64 and 256 px on 2 CPU threads. The bound leaves room for
# other kernels or thread counts choosing another summation order (float32 epsilon 1.2e-7, a few hundred terms).
RTOL = 1e-5


@pytest.fixture(scope="module")
def pair():
    """(ours, the package's) over the same random full-width VGG16."""
    import lpips  # a dependency (pyproject.toml): its absence is a failure here, not a skip
    vgg = load_vgg16(seed=5)
    with warnings.catch_warnings():  # torchvision's deprecation of `pretrained=`, which lpips still passes
        warnings.simplefilter("ignore", UserWarning)
        theirs = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    slices = [theirs.net.slice1, theirs.net.slice2, theirs.net.slice3, theirs.net.slice4, theirs.net.slice5]
    indexed = {int(name): module for s in slices for name, module in s.named_children()}  # torchvision's indices
    assert sorted(indexed) == list(range(RELU[LAYERS[-1]] + 1))
    with torch.no_grad():
        for i, module in indexed.items():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.copy_(vgg.features[i].weight)
                module.bias.copy_(vgg.features[i].bias)
    return load_lpips(vgg), theirs


@pytest.mark.parametrize("size", [64, 256])
def test_our_lpips_equals_the_packages(pair, size):
    ours, theirs = pair
    gen = torch.Generator().manual_seed(size)
    a = torch.rand(3, 3, size, size, generator=gen) * 2 - 1
    b = (a + 0.3 * torch.randn(3, 3, size, size, generator=gen)).clamp(-1, 1)
    with torch.no_grad():
        got = ours(a, ours.prepare(b))
        expected = theirs(a, b).reshape(-1)
    assert got.shape == (3,) and (expected > 0.01).all()
    assert torch.allclose(got, expected, rtol=RTOL, atol=0), (got - expected).abs().div(expected).max().item()


def test_the_learned_weights_are_the_wheels(pair):
    ours, theirs = pair
    for i, c in enumerate([64, 128, 256, 512, 512]):
        w = getattr(ours, f"lin{i}")
        assert w.shape == (1, c, 1, 1) and (w > 0).all()  # learned non-negative (clamped in training), none zero
        assert torch.equal(w, theirs.lins[i].model[-1].weight)


def test_identical_images_are_at_zero_and_the_distance_is_differentiable():
    lpips = load_lpips(load_vgg16(seed=1))
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 48, 48, generator=gen) * 2 - 1
    prepared = lpips.prepare(target)
    assert torch.equal(lpips(target, prepared), torch.zeros(2))
    img = (target + 0.2 * torch.randn(2, 3, 48, 48, generator=gen)).requires_grad_(True)
    d = lpips(img, prepared)
    d.sum().backward()
    assert (d > 0).all() and img.grad is not None and img.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips.parameters())  # the shared VGG16 stays frozen


def test_a_narrow_vgg_is_refused_and_a_missing_package_named(monkeypatch):
    with pytest.raises(LPIPSError, match="widths"):
        load_lpips(load_vgg16(width=0.125))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(LPIPSError, match="pip install lpips"):
        weights_path()
