"""detkit backbone plugin "resnet": residual networks (ResNet, pre-activation ResNet, Wide ResNet, ResNeXt,
SE-ResNet, SE-ResNeXt), with stochastic depth as an option of each. The architectures and the table of
variants (each with its paper) are in :mod:`detkit_resnet.resnet`."""
from detkit.backbones import register_variants
from detkit.hookspecs import hookimpl

from detkit_resnet.resnet import VARIANTS


@hookimpl
def detkit_register_backbones(register):
    register_variants(register, VARIANTS, family="resnet")
