"""The book's PyTorch networks: every network of the `cnnjax` zoo as the book's
PyTorch code (d2l's chapters 6 and 7) builds it, layer for layer, with the
architecture of our Flax models: same kernels, strides, paddings, widths, dropout,
batch-norm placement (momentum 0.1 in PyTorch's convention = 0.9 in ours, eps 1e-5)
and activations, so that `count_params(build(arch))` equals the JAX count. Weights
start Xavier-uniform, as the book's `train_ch6` initialises them.

The reference the project is checked against: `experiments.equivalence` and the
tests compare the Flax networks with these, `cnnjax.convert.from_torch` (and
`experiments.run --torch-weights`) reads their weights, and `experiments.bench
--torch` times them (`experiments.bench_torch`). Needs PyTorch, not torchvision.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cnnjax.config import recipe_settings

__all__ = ["build", "count_params"]


def _out(n: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a conv or pool along one axis (d2l §6.3)."""
    return (n + 2 * padding - kernel) // stride + 1


def _xavier_init(module: nn.Module) -> None:
    """`train_ch6`'s `init_weights`: Xavier-uniform weights for every conv and dense layer."""
    if type(module) in (nn.Linear, nn.Conv2d):
        nn.init.xavier_uniform_(module.weight)


# --- LeNet (§6.6) and LeNet with batch norm (§7.5) ---------------------------------

def lenet(resize: int = 28) -> nn.Module:
    """LeNet-5: sigmoids and 2x2 average pools; the first conv padded by 2."""
    n = _out(_out(_out(_out(resize, 5, padding=2), 2, 2), 5), 2, 2)
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * n * n, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, 10))


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum):
    """The book's from-scratch batch norm (§7.5.3): batch statistics (biased
    variance) while gradients are on, moving statistics otherwise."""
    if not torch.is_grad_enabled():
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        assert len(X.shape) in (2, 4)
        if len(X.shape) == 2:
            mean = X.mean(dim=0)
            var = ((X - mean) ** 2).mean(dim=0)
        else:
            mean = X.mean(dim=(0, 2, 3), keepdim=True)
            var = ((X - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        X_hat = (X - mean) / torch.sqrt(var + eps)
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
        moving_var = momentum * moving_var + (1.0 - momentum) * var
    Y = gamma * X_hat + beta
    return Y, moving_mean.detach(), moving_var.detach()


class TorchBatchNorm(nn.Module):
    """The book's `BatchNorm` layer (§7.5.3); `num_dims` is 2 after a dense layer,
    4 after a conv. The moving statistics are buffers (the book keeps them as
    plain tensors and moves them by hand) so `.to(device)` carries them along."""

    def __init__(self, num_features: int, num_dims: int):
        super().__init__()
        shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.register_buffer("moving_mean", torch.zeros(shape))
        self.register_buffer("moving_var", torch.ones(shape))

    def forward(self, X):
        Y, self.moving_mean, self.moving_var = batch_norm(
            X, self.gamma, self.beta, self.moving_mean, self.moving_var,
            eps=1e-5, momentum=0.9)
        return Y


def lenet_bn(resize: int = 28, scratch: bool = False) -> nn.Module:
    """LeNet with batch norm between every conv/hidden dense layer and its sigmoid
    (§7.5.4, or §7.5.5 with `nn.BatchNorm2d`/`nn.BatchNorm1d`); no padding."""
    def norm(channels: int, num_dims: int) -> nn.Module:
        if scratch:
            return TorchBatchNorm(channels, num_dims=num_dims)
        return nn.BatchNorm2d(channels) if num_dims == 4 else nn.BatchNorm1d(channels)

    n = _out(_out(_out(_out(resize, 5), 2, 2), 5), 2, 2)
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), norm(6, 4), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), norm(16, 4), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2), nn.Flatten(),
        nn.Linear(16 * n * n, 120), norm(120, 2), nn.Sigmoid(),
        nn.Linear(120, 84), norm(84, 2), nn.Sigmoid(),
        nn.Linear(84, 10))


# --- AlexNet (§7.1), VGG (§7.2), NiN (§7.3) ----------------------------------------

def alexnet(resize: int = 224) -> nn.Module:
    """AlexNet: five convs, three 3x3/2 max pools, two 4096-unit dense layers with
    dropout 0.5 (6400 flattened features at 224x224)."""
    n = _out(_out(_out(_out(resize, 11, 4, 1), 3, 2), 3, 2), 3, 2)
    return nn.Sequential(
        nn.Conv2d(1, 96, kernel_size=11, stride=4, padding=1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(96, 256, kernel_size=5, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Flatten(),
        nn.Linear(256 * n * n, 4096), nn.ReLU(), nn.Dropout(p=0.5),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(p=0.5),
        nn.Linear(4096, 10))


def vgg_block(num_convs: int, in_channels: int, out_channels: int) -> nn.Module:
    """`num_convs` 3x3 convs (padding 1) with ReLU, then a 2x2/2 max pool."""
    layers = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        layers.append(nn.ReLU())
        in_channels = out_channels
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


VGG11_ARCH = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))


def vgg(resize: int = 224, conv_arch=VGG11_ARCH, ratio: int = 4) -> nn.Module:
    """VGG (VGG-11 by default) with every conv width divided by `ratio` (§7.2.3)."""
    conv_blks, in_channels, n = [], 1, resize
    for num_convs, out_channels in conv_arch:
        out_channels //= ratio
        conv_blks.append(vgg_block(num_convs, in_channels, out_channels))
        in_channels, n = out_channels, n // 2
    return nn.Sequential(
        *conv_blks, nn.Flatten(),
        nn.Linear(in_channels * n * n, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 10))


def nin_block(in_channels, out_channels, kernel_size, strides, padding) -> nn.Module:
    """One ordinary conv and two 1x1 convs, ReLU after each."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, strides, padding), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU())


def nin() -> nn.Module:
    """NiN: four NiN blocks, 3x3/2 max pools, dropout 0.5 before the last block,
    global average pooling of one channel per class."""
    return nn.Sequential(
        nin_block(1, 96, kernel_size=11, strides=4, padding=0),
        nn.MaxPool2d(3, stride=2),
        nin_block(96, 256, kernel_size=5, strides=1, padding=2),
        nn.MaxPool2d(3, stride=2),
        nin_block(256, 384, kernel_size=3, strides=1, padding=1),
        nn.MaxPool2d(3, stride=2),
        nn.Dropout(0.5),
        nin_block(384, 10, kernel_size=3, strides=1, padding=1),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten())


# --- GoogLeNet (§7.4) --------------------------------------------------------------

class Inception(nn.Module):
    """Four parallel paths (1x1; 1x1 then 3x3; 1x1 then 5x5; 3x3 max pool then
    1x1) concatenated on channels; ReLU after every conv."""

    def __init__(self, in_channels, c1, c2, c3, c4):
        super().__init__()
        self.p1_1 = nn.Conv2d(in_channels, c1, kernel_size=1)
        self.p2_1 = nn.Conv2d(in_channels, c2[0], kernel_size=1)
        self.p2_2 = nn.Conv2d(c2[0], c2[1], kernel_size=3, padding=1)
        self.p3_1 = nn.Conv2d(in_channels, c3[0], kernel_size=1)
        self.p3_2 = nn.Conv2d(c3[0], c3[1], kernel_size=5, padding=2)
        self.p4_1 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.p4_2 = nn.Conv2d(in_channels, c4, kernel_size=1)

    def forward(self, x):
        p1 = F.relu(self.p1_1(x))
        p2 = F.relu(self.p2_2(F.relu(self.p2_1(x))))
        p3 = F.relu(self.p3_2(F.relu(self.p3_1(x))))
        p4 = F.relu(self.p4_2(self.p4_1(x)))
        return torch.cat((p1, p2, p3, p4), dim=1)


def googlenet() -> nn.Module:
    """GoogLeNet: blocks b1..b5 (nine Inception blocks) and a dense output layer."""
    def pool():
        return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    b1 = nn.Sequential(nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3),
                       nn.ReLU(), pool())
    b2 = nn.Sequential(nn.Conv2d(64, 64, kernel_size=1), nn.ReLU(),
                       nn.Conv2d(64, 192, kernel_size=3, padding=1), nn.ReLU(), pool())
    b3 = nn.Sequential(Inception(192, 64, (96, 128), (16, 32), 32),
                       Inception(256, 128, (128, 192), (32, 96), 64),
                       pool())
    b4 = nn.Sequential(Inception(480, 192, (96, 208), (16, 48), 64),
                       Inception(512, 160, (112, 224), (24, 64), 64),
                       Inception(512, 128, (128, 256), (24, 64), 64),
                       Inception(512, 112, (144, 288), (32, 64), 64),
                       Inception(528, 256, (160, 320), (32, 128), 128),
                       pool())
    b5 = nn.Sequential(Inception(832, 256, (160, 320), (32, 128), 128),
                       Inception(832, 384, (192, 384), (48, 128), 128),
                       nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())
    return nn.Sequential(b1, b2, b3, b4, b5, nn.Linear(1024, 10))


# --- ResNet (§7.6) and DenseNet (§7.7) ---------------------------------------------

class Residual(nn.Module):
    """Two 3x3 convs with batch norm, the input (through a 1x1 conv with
    `use_1x1conv`) added before the last ReLU."""

    def __init__(self, input_channels, num_channels, use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = nn.Conv2d(input_channels, num_channels, kernel_size=3,
                               padding=1, stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3 = nn.Conv2d(input_channels, num_channels, kernel_size=1,
                                   stride=strides)
        else:
            self.conv3 = None
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        Y += X
        return F.relu(Y)


def stem() -> nn.Module:
    """b1 of ResNet and DenseNet: 7x7/2 conv (padding 3), batch norm, ReLU, 3x3/2 max pool."""
    return nn.Sequential(nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3),
                         nn.BatchNorm2d(64), nn.ReLU(),
                         nn.MaxPool2d(kernel_size=3, stride=2, padding=1))


def resnet_block(input_channels, num_channels, num_residuals, first_block=False):
    """One stage: the first block halves the resolution (except in the first stage)."""
    blk = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(Residual(input_channels, num_channels, use_1x1conv=True, strides=2))
        else:
            blk.append(Residual(num_channels, num_channels))
    return blk


def resnet(stage_sizes=(2, 2, 2, 2)) -> nn.Module:
    """ResNet: stem, stages of 64/128/256/512 channels, global average pool, dense.
    (2, 2, 2, 2) is ResNet-18, (3, 4, 6, 3) ResNet-34."""
    blocks, in_channels = [stem()], 64
    for i, num_residuals in enumerate(stage_sizes):
        channels = 64 * 2**i
        blocks.append(nn.Sequential(*resnet_block(in_channels, channels, num_residuals,
                                                  first_block=(i == 0))))
        in_channels = channels
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
                         nn.Linear(in_channels, 10))


def conv_block(input_channels, num_channels) -> nn.Module:
    """DenseNet's conv block: batch norm, ReLU, 3x3 conv (padding 1)."""
    return nn.Sequential(
        nn.BatchNorm2d(input_channels), nn.ReLU(),
        nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1))


class DenseBlock(nn.Module):
    """`num_convs` conv blocks, each fed the concatenation of the input and all
    earlier outputs."""

    def __init__(self, num_convs, input_channels, num_channels):
        super().__init__()
        self.net = nn.Sequential(*[conv_block(num_channels * i + input_channels, num_channels)
                                   for i in range(num_convs)])

    def forward(self, X):
        for blk in self.net:
            Y = blk(X)
            X = torch.cat((X, Y), dim=1)
        return X


def transition_block(input_channels, num_channels) -> nn.Module:
    """Batch norm, ReLU, 1x1 conv to `num_channels`, 2x2/2 average pool."""
    return nn.Sequential(
        nn.BatchNorm2d(input_channels), nn.ReLU(),
        nn.Conv2d(input_channels, num_channels, kernel_size=1),
        nn.AvgPool2d(kernel_size=2, stride=2))


def densenet(num_convs_in_dense_blocks=(4, 4, 4, 4), growth_rate: int = 32) -> nn.Module:
    """DenseNet: stem, dense blocks with channel-halving transitions, batch norm,
    ReLU, global average pool, dense."""
    num_channels, blks = 64, []
    for i, num_convs in enumerate(num_convs_in_dense_blocks):
        blks.append(DenseBlock(num_convs, num_channels, growth_rate))
        num_channels += num_convs * growth_rate
        if i != len(num_convs_in_dense_blocks) - 1:
            blks.append(transition_block(num_channels, num_channels // 2))
            num_channels //= 2
    return nn.Sequential(
        stem(), *blks,
        nn.BatchNorm2d(num_channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
        nn.Linear(num_channels, 10))


# --- ResNeXt blocks and AnyNet/RegNetX-32 (the English edition's §8.6.5 and §8.8) ----

class ResNeXtBlock(nn.Module):
    """1x1 conv to bot_channels, 3x3 grouped conv (groups of `groups` channels), 1x1
    conv back, each with batch norm; the input (through a 1x1 conv and batch norm
    with `use_1x1conv`) added before the last ReLU."""

    def __init__(self, input_channels, num_channels, groups, bot_mul, use_1x1conv=False,
                 strides=1):
        super().__init__()
        bot_channels = int(round(num_channels * bot_mul))
        self.conv1 = nn.Conv2d(input_channels, bot_channels, kernel_size=1, stride=1)
        self.conv2 = nn.Conv2d(bot_channels, bot_channels, kernel_size=3, stride=strides,
                               padding=1, groups=bot_channels // groups)
        self.conv3 = nn.Conv2d(bot_channels, num_channels, kernel_size=1, stride=1)
        self.bn1 = nn.BatchNorm2d(bot_channels)
        self.bn2 = nn.BatchNorm2d(bot_channels)
        self.bn3 = nn.BatchNorm2d(num_channels)
        if use_1x1conv:
            self.conv4 = nn.Conv2d(input_channels, num_channels, kernel_size=1,
                                   stride=strides)
            self.bn4 = nn.BatchNorm2d(num_channels)
        else:
            self.conv4 = None

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = F.relu(self.bn2(self.conv2(Y)))
        Y = self.bn3(self.conv3(Y))
        if self.conv4:
            X = self.bn4(self.conv4(X))
        return F.relu(Y + X)


def anynet(arch=((4, 32, 16, 1), (6, 80, 16, 1)), stem_channels=32) -> nn.Module:
    """AnyNet: a 3x3/2 conv stem with batch norm and ReLU, one stage of ResNeXt blocks
    per (depth, channels, groups, bot_mul) entry of `arch` (the first block of each
    halves the resolution), global average pool, dense. The default is RegNetX-32."""
    layers = [nn.Sequential(nn.Conv2d(1, stem_channels, kernel_size=3, stride=2, padding=1),
                            nn.BatchNorm2d(stem_channels), nn.ReLU())]
    in_channels = stem_channels
    for depth, num_channels, groups, bot_mul in arch:
        blocks = [ResNeXtBlock(in_channels, num_channels, groups, bot_mul,
                               use_1x1conv=True, strides=2)]
        blocks += [ResNeXtBlock(num_channels, num_channels, groups, bot_mul)
                   for _ in range(depth - 1)]
        layers.append(nn.Sequential(*blocks))
        in_channels = num_channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
                         nn.Linear(in_channels, 10))


# --- the zoo -----------------------------------------------------------------------

_BUILDERS = {
    "lenet": lambda r: lenet(r),
    "lenet_bn_scratch": lambda r: lenet_bn(r, scratch=True),
    "lenet_bn": lambda r: lenet_bn(r),
    "alexnet": lambda r: alexnet(r),
    "vgg11": lambda r: vgg(r),
    "nin": lambda r: nin(),
    "googlenet": lambda r: googlenet(),
    "resnet18": lambda r: resnet((2, 2, 2, 2)),
    "resnet34": lambda r: resnet((3, 4, 6, 3)),
    "densenet": lambda r: densenet(),
    "regnetx32": lambda r: anynet(),
}


def build(arch: str, *, resize: int | None = None) -> nn.Module:
    """PyTorch network `arch` (a `cnnjax` registry name) for 1-channel images and
    10 classes, Xavier-initialised. `resize` (default: the recipe's) sizes the
    first dense layer of the networks that flatten (LeNet, AlexNet, VGG)."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown model {arch!r}; valid names: {', '.join(_BUILDERS)}")
    model = _BUILDERS[arch](resize or recipe_settings(arch)["resize"])
    model.apply(_xavier_init)
    return model


def count_params(model: nn.Module) -> int:
    """Number of trainable values (moving statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
