"""The networks of d2l's "Convolutional Neural Networks" and "Modern Convolutional
Neural Networks" chapters as Flax linen modules, the registry that names them and
tools to look inside them."""

from cnnjax.models.alexnet import AlexNet
from cnnjax.models.densenet import DenseBlock, DenseNet, conv_block, transition_block
from cnnjax.models.googlenet import GoogLeNet, Inception
from cnnjax.models.lenet import LeNet, LeNetBN
from cnnjax.models.nin import NiN, nin_block
from cnnjax.models.regnet import AnyNet, ResNeXtBlock
from cnnjax.models.registry import describe, get_model, list_models
from cnnjax.models.resnet import CifarResNet, Residual, ResNet, Stem, resnet_block
from cnnjax.models.summary import (
    BlockInfo,
    accepts_input,
    block_infos,
    count_params,
    min_input_size,
    summary,
)
from cnnjax.models.vgg import VGG, vgg_block

__all__ = [
    "accepts_input", "AlexNet", "AnyNet", "block_infos", "BlockInfo", "CifarResNet",
    "conv_block", "count_params", "DenseBlock", "DenseNet", "describe", "get_model",
    "GoogLeNet", "Inception", "LeNet", "LeNetBN", "list_models", "min_input_size", "NiN",
    "nin_block", "Residual", "ResNet", "resnet_block", "ResNeXtBlock", "Stem", "summary",
    "transition_block", "VGG", "vgg_block",
]
