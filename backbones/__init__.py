"""Backbone families, one module each; importing them fills fastbone's model registry."""
from . import layers
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from .vgg import VGG, vgg16, vgg16_bn, vgg19, vgg19_bn
from .efficientnet import (EfficientNet, efficientnet_b0, efficientnet_b1, efficientnet_b2, efficientnet_b3,
                           efficientnet_b4, efficientnet_b5, efficientnet_b6, efficientnet_b7, efficientnet_v2_s,
                           efficientnet_v2_m, efficientnet_v2_l)
from .mobilenet import MobileNetV1, MobileNetV2, mobilenet_v2, mobilenetv1_100, mobilenetv1_100h, mobilenetv1_125
from .squeezenet import SqueezeNet, squeezenet1_0, squeezenet1_1
from .darknet import DarkNet19, darknet19
from .inception import GoogLeNet, InceptionResnetV2, googlenet, inception_resnet_v2
from .shufflenet import (ShuffleNetV1, ShuffleNetV2, shufflenet_v1, shufflenet_v1_g3_x0_5, shufflenet_v1_g3_x1_0,
                         shufflenet_v1_g3_x1_5, shufflenet_v1_g3_x2_0, shufflenet_v1_g8_x0_5, shufflenet_v1_g8_x1_0,
                         shufflenet_v1_g8_x1_5, shufflenet_v1_g8_x2_0, shufflenet_v2_x0_5, shufflenet_v2_x1_0,
                         shufflenet_v2_x1_5, shufflenet_v2_x2_0)

__all__ = ["ResNet", "VGG", "layers", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
           "MobileNetV1", "MobileNetV2", "mobilenet_v2", "mobilenetv1_100", "mobilenetv1_100h", "mobilenetv1_125",
           "SqueezeNet", "squeezenet1_0", "squeezenet1_1"]
__all__ += ["DarkNet19", "darknet19"]
__all__ += ["GoogLeNet", "InceptionResnetV2", "googlenet", "inception_resnet_v2"]
__all__ += ["ShuffleNetV1", "ShuffleNetV2", "shufflenet_v1", "shufflenet_v1_g3_x0_5", "shufflenet_v1_g3_x1_0",
            "shufflenet_v1_g3_x1_5", "shufflenet_v1_g3_x2_0", "shufflenet_v1_g8_x0_5", "shufflenet_v1_g8_x1_0",
            "shufflenet_v1_g8_x1_5", "shufflenet_v1_g8_x2_0", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
            "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"]
__all__ += ["EfficientNet", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
            "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_s", "efficientnet_v2_m",
            "efficientnet_v2_l"]
