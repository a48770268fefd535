"""detkit backbone plugin: DenseNet and FractalNet."""
from detkit.hookspecs import hookimpl

from detkit_densenet import densenet, fractalnet


@hookimpl
def detkit_register_backbones(register):
    for name, builder in densenet.VARIANTS.items():
        register(name, builder, family="densenet", paper="Huang et al. 2017")
    for name, builder in fractalnet.VARIANTS.items():
        register(name, builder, family="fractalnet", paper="Larsson et al. 2017")
