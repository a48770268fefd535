"""detkit backbone plugin: classic CNNs."""
from detkit.hookspecs import hookimpl

from detkit_classic.vgg import VARIANTS as VGG_VARIANTS


@hookimpl
def detkit_register_backbones(register):
    for name, builder in VGG_VARIANTS.items():
        register(name, builder, family="vgg", paper="Simonyan & Zisserman 2015")
