"""The networks of d2l's "Convolutional Neural Networks" and "Modern Convolutional
Neural Networks" chapters as Flax linen modules, and the registry that names them."""

from cnnjax.models.alexnet import AlexNet
from cnnjax.models.densenet import DenseBlock, DenseNet, conv_block, transition_block
from cnnjax.models.googlenet import GoogLeNet, Inception
from cnnjax.models.lenet import LeNet, LeNetBN
from cnnjax.models.nin import NiN, nin_block
from cnnjax.models.registry import (
    BlockInfo,
    Recipe,
    accepts_input,
    block_infos,
    count_params,
    describe,
    get_model,
    list_models,
    min_input_size,
    recipe,
    summary,
)
from cnnjax.models.resnet import Residual, ResNet, Stem, resnet_block
from cnnjax.models.vgg import VGG, vgg_block

__all__ = [
    "AlexNet", "BlockInfo", "accepts_input", "min_input_size", "DenseBlock", "DenseNet", "GoogLeNet", "Inception", "LeNet",
    "LeNetBN", "NiN", "Recipe", "ResNet", "Residual", "Stem", "VGG", "block_infos",
    "conv_block", "count_params", "describe", "get_model", "list_models", "nin_block",
    "recipe", "resnet_block", "summary", "transition_block", "vgg_block",
]
