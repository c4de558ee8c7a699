"""Backbone families, one module each; importing them fills fastbone's model registry."""
from . import layers
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from .vgg import VGG, vgg16, vgg16_bn, vgg19, vgg19_bn

__all__ = ["ResNet", "VGG", "layers", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]
