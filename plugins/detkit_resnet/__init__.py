"""detkit backbone plugin "resnet": residual networks (ResNet, pre-activation ResNet, Wide ResNet, ResNeXt,
SE-ResNet, SE-ResNeXt), with stochastic depth as an option of each. The architectures are in
:mod:`detkit_resnet.resnet`."""
from detkit.hookspecs import hookimpl

from detkit_resnet.resnet import VARIANTS

# Registered-name prefix -> the paper that defines the variant.
PAPERS = {
    "resnet": "He et al. 2016 (deep residual learning)",
    "preact": "He et al. 2016 (identity mappings)",
    "wide": "Zagoruyko & Komodakis 2016",
    "wrn": "Zagoruyko & Komodakis 2016",
    "resnext": "Xie et al. 2017",
    "se": "Hu et al. 2018",
}


def paper_of(name: str) -> str:
    return PAPERS[name.split("_")[0].rstrip("0123456789")]


@hookimpl
def detkit_register_backbones(register):
    for name, builder in VARIANTS.items():
        register(name, builder, family="resnet", paper=paper_of(name))
