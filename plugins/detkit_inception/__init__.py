"""detkit backbone plugin: the Inception family (GoogLeNet and its naive-module form, BN-Inception,
Inception-v3, Inception-v4, Inception-ResNet-v1/v2). Entry point name: ``inception``.

The family's table of variants is below; the networks are in :mod:`detkit_inception.googlenet`,
:mod:`detkit_inception.inception_v3` and :mod:`detkit_inception.inception_v4`.
"""
from detkit.backbones import INCEPTION_MEAN, INCEPTION_STD, BackboneDefaults, Variant, register_variants
from detkit.hookspecs import hookimpl

from detkit_inception.googlenet import BNInception, GoogLeNet
from detkit_inception.inception_v3 import InceptionV3
from detkit_inception.inception_v4 import inception_resnet_v1, inception_resnet_v2, inception_v4

SZEGEDY_2015, SZEGEDY_2017 = "Szegedy et al. 2015", "Szegedy et al. 2017"
#: GoogLeNet: 224x224, 7x7 RoIs (the max pool ahead of inception5a makes them 4x4), inputs down to 15x15
GOOGLENET_DEFAULTS = BackboneDefaults(input_size=(3, 224, 224), roi_output_size=7, min_input_size=15)
#: torchvision's pretrained GoogLeNet expects inputs in [-1, 1] (see googlenet's module docstring)
GOOGLENET_TORCHVISION = BackboneDefaults(input_size=(3, 224, 224), mean=INCEPTION_MEAN, std=INCEPTION_STD,
                                         roi_output_size=7, min_input_size=15)
#: Inception-v3/v4: 299x299 [-1, 1] inputs, 14x14 RoIs (the 17 -> 8 reduction makes them 6x6), inputs down to 75x75
INCEPTION_299 = BackboneDefaults(input_size=(3, 299, 299), mean=INCEPTION_MEAN, std=INCEPTION_STD,
                                 roi_output_size=14, min_input_size=75)

VARIANTS: list[Variant] = [
    Variant("googlenet", GoogLeNet, f"{SZEGEDY_2015} (torchvision)", GOOGLENET_TORCHVISION, args=dict(bn=True),
            options=dict(num_classes=1000, aux_logits=True, naive=False, dropout=0.2),
            doc="torchvision's GoogLeNet (same names; 13,004,888 parameters with the auxiliary classifiers, "
                "6,624,904 without). naive=True swaps every module for the naive one of Fig. 2a (with true 5x5 "
                "kernels; torchvision checkpoints then no longer fit)."),
    Variant("googlenet_v1", GoogLeNet, SZEGEDY_2015, GOOGLENET_DEFAULTS,
            args=dict(bn=False, k5=5, lrn=True, dropout=0.4),
            options=dict(num_classes=1000, aux_logits=True, naive=False),
            doc="The paper's GoogLeNet (Table 1): 5x5 kernels, no batch norm, LRN after conv1 and conv3, dropout "
                "0.4; 13,378,280 parameters with the auxiliary classifiers."),
    Variant("googlenet_naive", GoogLeNet, f"{SZEGEDY_2015}, Fig. 2a", GOOGLENET_TORCHVISION,
            args=dict(bn=True, naive=True, dropout=0.2), options=dict(num_classes=1000, aux_logits=True),
            doc="googlenet(naive=True): GoogLeNet built from naive Inception modules (Fig. 2a)."),
    Variant("bn_inception", BNInception, "Ioffe & Szegedy 2015",
            BackboneDefaults(input_size=(3, 224, 224), roi_output_size=7, min_input_size=7),
            options=dict(num_classes=1000, dropout=0.0),
            doc="BN-Inception as the table of Ioffe & Szegedy's Fig. 5 (11,285,224 parameters; the table's widths "
                "give 608 channels after 4c/4d where its output column says 576, as in the released Caffe model)."),
    Variant("inception_v3", InceptionV3, "Szegedy et al. 2016 (torchvision)", INCEPTION_299,
            options=dict(num_classes=1000, aux_logits=True, label_smoothing=0.1, aux_weight=0.4, dropout=0.5),
            doc="torchvision's Inception-v3 (27,161,264 parameters with aux_logits, 23,834,568 without)."),
    Variant("inception_v4", inception_v4, SZEGEDY_2017, INCEPTION_299, options=dict(num_classes=1000, dropout=0.2)),
    Variant("inception_resnet_v1", inception_resnet_v1, SZEGEDY_2017, INCEPTION_299,
            options=dict(num_classes=1000, dropout=0.2)),
    Variant("inception_resnet_v2", inception_resnet_v2, SZEGEDY_2017, INCEPTION_299,
            options=dict(num_classes=1000, dropout=0.2, layout="slim")),
]


@hookimpl
def detkit_register_backbones(register):
    register_variants(register, VARIANTS, family="inception")
