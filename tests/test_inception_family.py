"""Inception family specifics: auxiliary classifiers, label smoothing, torchvision checkpoints, counts."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

from detkit.plugins import get_registries

REGISTRY = get_registries()


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_googlenet_aux_classifiers_and_loss():
    model = REGISTRY.backbones.build("googlenet", num_classes=5)
    x, y = torch.randn(2, 3, 96, 96), torch.tensor([1, 4])
    model.train()
    main, aux1, aux2 = model(x)
    loss = model.classification_loss((main, aux1, aux2), y)
    expected = F.cross_entropy(main, y) + 0.3 * F.cross_entropy(aux1, y) + 0.3 * F.cross_entropy(aux2, y)
    torch.testing.assert_close(loss, expected)
    model.eval()
    assert model(x).shape == (2, 5)  # auxiliary classifiers discarded at inference
    with torch.device("meta"):
        assert count(REGISTRY.backbones.build("googlenet", aux_logits=False)) == 6_624_904
        assert count(REGISTRY.backbones.build("inception_v3", aux_logits=False)) == 23_834_568


def test_inception_v3_label_smoothing():
    plain = REGISTRY.backbones.build("inception_v3", num_classes=4)
    smooth = REGISTRY.backbones.build("inception_v3", num_classes=4, label_smoothing=0.1)
    logits, y = torch.tensor([[8.0, 0.0, 0.0, 0.0]]), torch.tensor([0])
    p = F.log_softmax(logits, 1)[0]
    assert plain.classification_loss(logits, y) == pytest.approx(float(-p[0]))
    # Szegedy et al. 2016, Sec. 7: q' = (1 - eps) q + eps / K.
    assert smooth.classification_loss(logits, y) == pytest.approx(float(-(0.9 + 0.025) * p[0] - 0.025 * p[1:].sum()))


def test_torchvision_googlenet_checkpoint_loads(tmp_path):
    tv = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, transform_input=False).eval()
    torch.save(tv.state_dict(), tmp_path / "g.pth")
    ours = REGISTRY.backbones.build("googlenet").eval()
    assert ours.load_pretrained(tmp_path / "g.pth") == []
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))


def test_naive_module_has_no_reductions():
    from detkit_inception.googlenet import Inception

    naive = Inception(192, 64, 96, 128, 16, 32, 32, bn=False, k5=5, naive=True)
    assert naive.out_channels == 64 + 128 + 32 + 192  # pooling branch passes all input channels
    assert naive(torch.randn(1, 192, 8, 8)).shape == (1, naive.out_channels, 8, 8)


@pytest.mark.parametrize("name,count_", [("inception_v4", 42_679_816), ("inception_resnet_v1", 22_756_328),
                                         ("inception_resnet_v2", 32_433_928), ("bn_inception", 11_285_224)])
def test_pinned_parameter_counts(name, count_):
    # Inception-v4 equals the common implementations' 42.7M; the others are pinned to the networks of the
    # papers' figures (see the module docstrings for how they relate to published numbers).
    with torch.device("meta"):
        assert count(REGISTRY.backbones.build(name)) == count_
