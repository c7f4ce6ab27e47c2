"""Our VGG16 is torchvision's, module for module: its ImageNet weights file loads into ours and gives the same
features (torchvision is imported here only, to compare with; the engine does without it)."""

from __future__ import annotations

import torch

from engine.perceptual import IMAGENET_MEAN, IMAGENET_STD, RELU, imagenet_input, load_vgg16


def test_torchvisions_vgg16_weights_load_and_give_the_same_features(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    theirs = make_layers(cfgs["D"]).eval()  # vgg16().features, the part of vgg16-397923af.pth we use
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in theirs.state_dict().items()} | {"classifier.0.weight": torch.zeros(1)},
               path)
    ours = load_vgg16(path)
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    x = ((img + 1) / 2 - torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    expected = {}
    with torch.no_grad():
        for i, layer in enumerate(theirs):
            x = layer(x)
            expected[i] = x.clone()
        got = ours(imagenet_input(img), list(RELU))
    for name, feat in zip(RELU, got):
        assert torch.equal(feat, expected[RELU[name]]), name  # the same modules, weights and order: bit for bit
