"""detkit backbone plugin "classic": the CNNs before residual learning, as the reference notes describe
them (the small MNIST/CIFAR network, LeNet-5, AlexNet/CaffeNet and torchvision's AlexNet, ZFNet, VGG A-E,
Network in Network, a Maxout network, the PReLU-nets and SqueezeNet).

Each family module has a table of variants (``VARIANTS``), each row with its name and paper.
"""
from detkit.backbones import register_variants
from detkit.hookspecs import hookimpl

from detkit_classic import early, squeezenet, vgg


@hookimpl
def detkit_register_backbones(register):
    register_variants(register, early.VARIANTS, family="classic")
    register_variants(register, vgg.VARIANTS, family="vgg")
    register_variants(register, squeezenet.VARIANTS, family="squeezenet")
