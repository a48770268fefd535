"""detkit backbone plugin: the Inception family (GoogLeNet and its naive-module form, BN-Inception,
Inception-v3, Inception-v4, Inception-ResNet-v1/v2). Entry point name: ``inception``."""
from detkit.hookspecs import hookimpl

from detkit_inception import googlenet, inception_v3, inception_v4

#: registered name -> (builder, short citation)
VARIANTS = {
    "googlenet": (googlenet.googlenet, "Szegedy et al. 2015 (torchvision)"),
    "googlenet_v1": (googlenet.googlenet_v1, "Szegedy et al. 2015"),
    "googlenet_naive": (googlenet.googlenet_naive, "Szegedy et al. 2015, Fig. 2a"),
    "bn_inception": (googlenet.bn_inception, "Ioffe & Szegedy 2015"),
    "inception_v3": (inception_v3.inception_v3, "Szegedy et al. 2016 (torchvision)"),
    "inception_v4": (inception_v4.inception_v4, "Szegedy et al. 2017"),
    "inception_resnet_v1": (inception_v4.inception_resnet_v1, "Szegedy et al. 2017"),
    "inception_resnet_v2": (inception_v4.inception_resnet_v2, "Szegedy et al. 2017"),
}


@hookimpl
def detkit_register_backbones(register):
    for name, (builder, paper) in VARIANTS.items():
        register(name, builder, family="inception", paper=paper)
