"""detkit backbone plugin "classic": the CNNs before residual learning, as the reference notes describe
them (the small MNIST/CIFAR network, LeNet-5, AlexNet/CaffeNet and torchvision's AlexNet, ZFNet, VGG A-E,
Network in Network, a Maxout network, the PReLU-nets and SqueezeNet).

Each variant registers under one name with the family it belongs to and the paper it follows.
"""
from detkit.hookspecs import hookimpl

from detkit_classic import early, squeezenet, vgg

PAPERS = {
    "mnist_cnn": "reference notes (small CNN)", "cifar_cnn": "reference notes (small CNN)",
    "lenet5": "LeCun et al. 1998", "alexnet": "Krizhevsky et al. 2012 (CaffeNet)",
    "alexnet_tv": "Krizhevsky 2014 (torchvision)", "zfnet": "Zeiler & Fergus 2014",
    "zfnet_512_1024_512": "Zeiler & Fergus 2014", "nin": "Lin et al. 2014", "nin_cifar": "Lin et al. 2014",
    "maxout_cnn": "Goodfellow et al. 2013", "prelu_net_a": "He et al. 2015", "prelu_net_b": "He et al. 2015",
    "prelu_net_c": "He et al. 2015",
}


@hookimpl
def detkit_register_backbones(register):
    for name, builder in early.VARIANTS.items():
        register(name, builder, family="classic", paper=PAPERS[name])
    for name, builder in vgg.VARIANTS.items():
        register(name, builder, family="vgg", paper="Simonyan & Zisserman 2015")
    for name, builder in squeezenet.VARIANTS.items():
        register(name, builder, family="squeezenet", paper="Iandola et al. 2016")
