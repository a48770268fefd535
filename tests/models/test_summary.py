"""`detkit summary` against the reference notes' layer tables, line by line, and the ResNet paper's FLOPs."""
import pytest
import torch
from torch import nn

from detkit.models.summary import LayerRow, format_summary, summarize, summary_command, total_macs, totals

# (type, parameters, operations, output volume) per row, transcribed from the notes (survey, "network
# architectures"), the notes' input row left out. The last row is the notes' softmax, which has no module
# here (the models return logits; the softmax is part of the loss), so the test drops it by name.
MNIST = [("conv(5, 32)", 832, 479232, 24 * 24 * 32), ("pool(2)", 0, 18432, 12 * 12 * 32),
         ("conv(5, 64)", 51264, 3280896, 8 * 8 * 64), ("pool(2)", 0, 4096, 4 * 4 * 64),
         ("fc(100)", 102500, 102500, 100), ("fc(10)", 1010, 1010, 10), ("softmax", 0, 0, 10)]
CIFAR = [("conv(5, 32)", 2432, 1906688, 28 * 28 * 32), ("pool(2)", 0, 25088, 14 * 14 * 32),
         ("conv(5, 64)", 51264, 5126400, 10 * 10 * 64), ("pool(2)", 0, 6400, 5 * 5 * 64),
         ("fc(100)", 160100, 160100, 100), ("fc(10)", 1010, 1010, 10), ("softmax", 0, 0, 10)]
LENET5 = [("conv(5, 6)", 156, 122304, 28 * 28 * 6), ("avg(2)", 0, 4704, 14 * 14 * 6),
          ("conv(5, 16)", 2416, 241600, 10 * 10 * 16), ("avg(2)", 0, 1600, 5 * 5 * 16),
          ("conv(5, 120)", 48120, 48120, 120), ("fc(84)", 10164, 10164, 84), ("fc(10)", 850, 850, 10),
          ("softmax", 0, 10, 10)]
ALEXNET = [("conv(11, 96, s4)", 34944, 105705600, 55 * 55 * 96), ("pool(3, 2)", 0, 290400, 27 * 27 * 96),
           ("norm", 0, 69984, 27 * 27 * 96), ("conv(5, 256, p2)", 614656, 448084224, 27 * 27 * 256),
           ("pool(3, 2)", 0, 186624, 13 * 13 * 256), ("norm", 0, 43264, 13 * 13 * 256),
           ("conv(3, 384, p1)", 885120, 149585280, 13 * 13 * 384),
           ("conv(3, 384, p1)", 1327488, 224345472, 13 * 13 * 384),
           ("conv(3, 256, p1)", 884992, 149563648, 13 * 13 * 256), ("pool(3, 2)", 0, 43264, 6 * 6 * 256),
           ("fc(4096)", 37752832, 37752832, 4096), ("fc(4096)", 16781312, 16781312, 4096),
           ("fc(1000)", 4097000, 4097000, 1000), ("softmax", 0, 1000, 1000)]
# The notes print 89,915,390 for VGG-16's first convolution; 224*224*64*(3*3*3+1) is 89,915,392
# (every other row follows the formula exactly), so the formula's value is used.
VGG16 = [("conv(3, 64, p1)", 1792, 89915392, 224 * 224 * 64), ("conv(3, 64, p1)", 36928, 1852899328, 224 * 224 * 64),
         ("pool(2)", 0, 3211264, 112 * 112 * 64), ("conv(3, 128, p1)", 73856, 926449664, 112 * 112 * 128),
         ("conv(3, 128, p1)", 147584, 1851293696, 112 * 112 * 128), ("pool(2)", 0, 1605632, 56 * 56 * 128),
         ("conv(3, 256, p1)", 295168, 925646848, 56 * 56 * 256), ("conv(3, 256, p1)", 590080, 1850490880, 56 * 56 * 256),
         ("conv(3, 256, p1)", 590080, 1850490880, 56 * 56 * 256), ("pool(2)", 0, 802816, 28 * 28 * 256),
         ("conv(3, 512, p1)", 1180160, 925245440, 28 * 28 * 512), ("conv(3, 512, p1)", 2359808, 1850089472, 28 * 28 * 512),
         ("conv(3, 512, p1)", 2359808, 1850089472, 28 * 28 * 512), ("pool(2)", 0, 401408, 14 * 14 * 512),
         ("conv(3, 512, p1)", 2359808, 462522368, 14 * 14 * 512), ("conv(3, 512, p1)", 2359808, 462522368, 14 * 14 * 512),
         ("conv(3, 512, p1)", 2359808, 462522368, 14 * 14 * 512), ("pool(2)", 0, 100352, 7 * 7 * 512),
         ("fc(4096)", 102764544, 102764544, 4096), ("fc(4096)", 16781312, 16781312, 4096),
         ("fc(1000)", 4097000, 4097000, 1000), ("softmax", 0, 1000, 1000)]


@pytest.mark.parametrize("name,size,table", [
    ("mnist_cnn", (1, 28, 28), MNIST), ("cifar_cnn", (3, 32, 32), CIFAR), ("lenet5", (1, 32, 32), LENET5),
    ("alexnet", (3, 227, 227), ALEXNET), ("vgg16", (3, 224, 224), VGG16)])
def test_summary_matches_notes_line_by_line(name, size, table, registries):
    assert table[-1][0] == "softmax"
    table = table[:-1]
    with torch.device("meta"):
        model = registries.backbones.build(name, num_classes=table[-1][3])
    assert model.defaults.input_size == size
    rows = summarize(model, size)
    assert [(r.type, r.params, r.ops, r.volume) for r in rows] == table
    t = totals(rows)
    assert (t["params"], t["ops"], t["volume"]) == tuple(sum(row[i] for row in table) for i in (1, 2, 3))
    text = format_summary(rows, name, size)
    assert f"total parameters: {t['params']:,}" in text and f"total operations: {t['ops']:,}" in text
    assert f"total output volume: {t['volume']:,}" in text


def test_totals_of_the_notes_tables(registries):
    # The notes' AlexNet and VGG-16 totals (sums of their rows without the softmax): 62,378,344 and
    # 138,357,544 parameters, the latter torchvision's count too.
    assert totals(summarize(_meta(registries, "alexnet"), (3, 227, 227)))["params"] == 62_378_344
    vgg = totals(summarize(_meta(registries, "vgg16"), (3, 224, 224)))
    assert vgg["params"] == 138_357_544 and vgg["ops"] == 15_489_942_504


def test_counting_convention_on_a_hand_built_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, groups=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5, bias=False))
    rows = summarize(model, (3, 8, 8))
    assert [(r.type, r.params, r.ops, r.macs, r.output) for r in rows] == [
        ("conv(3, 4, p1)", 112, 8 * 8 * 4 * 28, 8 * 8 * 4 * 27, (4, 8, 8)),
        ("pool(2)", 0, 8 * 8 * 4, 0, (4, 4, 4)),  # one operation per input element, as the notes count
        ("bn", 8, 4 * 4 * 4, 0, (4, 4, 4)),  # one per element, as the notes count "norm"
        ("fc(5)", 320, 320, 320, (5,))]
    assert total_macs(rows) == 8 * 8 * 4 * 27 + 320
    assert isinstance(rows[0], LayerRow) and rows[0].name == "0"
    with pytest.raises(ValueError, match="C, H, W"):
        summarize(model, (3, 8))


def _meta(registries, name):
    with torch.device("meta"):
        return registries.backbones.build(name)


@pytest.mark.parametrize("name,gflops", [("resnet18", 1.8), ("resnet34", 3.6), ("resnet50", 3.8),
                                         ("resnet101", 7.6), ("resnet152", 11.3)])
def test_resnet_flops_match_the_paper_table(name, gflops, registries):
    rows = summarize(_meta(registries, name), (3, 224, 224))
    # The ResNet table's "FLOPs" are multiply-adds of the weights; it prints them to one decimal.
    assert abs(total_macs(rows) / 1e9 - gflops) < 0.1


def test_summary_command_prints_totals(registries):
    text = summary_command(registries, "lenet5")
    assert "total parameters: 61,706" in text and "conv(5, 120)" in text
    assert "input(32, 1)" in text and "32 x 32 x 1" in text and "1 x 1 x 120" in text
    assert "total parameters: 62,378,344" in summary_command(registries, "alexnet", (3, 227, 227))
    with pytest.raises(ValueError, match="cannot run"):
        summary_command(registries, "alexnet", (3, 16, 16))
