"""detkit backbone plugin: residual networks (ResNet, pre-activation ResNet, Wide ResNet, ResNeXt, SE-ResNet,
SE-ResNeXt; stochastic depth as an option of each)."""
from detkit.hookspecs import hookimpl

from detkit_resnet.resnet import VARIANTS

PAPERS = {"resnet": "He et al. 2016", "preact": "He et al. 2016 (identity mappings)",
          "wide": "Zagoruyko & Komodakis 2016", "wrn": "Zagoruyko & Komodakis 2016", "resnext": "Xie et al. 2017",
          "se": "Hu et al. 2018"}


@hookimpl
def detkit_register_backbones(register):
    for name, builder in VARIANTS.items():
        register(name, builder, family="resnet", paper=PAPERS[name.split("_")[0].rstrip("0123456789")])
