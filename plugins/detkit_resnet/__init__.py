"""detkit backbone plugin: residual networks."""
from detkit.hookspecs import hookimpl

from detkit_resnet.resnet import VARIANTS


@hookimpl
def detkit_register_backbones(register):
    for name, builder in VARIANTS.items():
        register(name, builder, family="resnet", paper="He et al. 2016")
