"""detkit backbone plugin: DenseNet and FractalNet (a table of variants each)."""
from detkit.backbones import register_variants
from detkit.hookspecs import hookimpl

from detkit_densenet import densenet, fractalnet


@hookimpl
def detkit_register_backbones(register):
    register_variants(register, densenet.VARIANTS, family="densenet")
    register_variants(register, fractalnet.VARIANTS, family="fractalnet")
