import pickle

import pytest
import torch
import torchvision

from models import MODEL_NAMES, ModelError, build_model


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("stem", ["standard", "seed"])
def test_every_model_trains_every_parameter(name, stem):
    torch.manual_seed(0)
    model = build_model(name, stem=stem)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


def test_seed_stem_has_no_maxpool_and_4x_larger_maps():
    standard, seed = build_model("resnet18"), build_model("resnet18", stem="seed")
    x = torch.randn(1, 3, 64, 64)
    def layer1(m):
        return m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))
    assert layer1(standard).shape[-2:] == (16, 16) and layer1(seed).shape[-2:] == (32, 32)
    assert isinstance(seed.maxpool, torch.nn.Identity)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ModelError, match="resnet18, resnet50, resnet152"):
        build_model("resnet34")


def test_pretrained_loads_the_backbone_and_replaces_the_head(tmp_path):
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18(num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "r18.pth")
    model = build_model("resnet18", pretrained=tmp_path / "r18.pth")
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert model.fc.out_features == 2


def test_pretrained_errors(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        build_model("resnet18", pretrained=tmp_path / "none.pth")
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ModelError, match="does not fit"):
        build_model("resnet18", pretrained=tmp_path / "r50.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv1.weight": Evil()}, f)
    with pytest.raises(ModelError, match="not a loadable weights file"):
        build_model("resnet18", pretrained=tmp_path / "evil.pth")
