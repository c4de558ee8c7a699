"""fastbone: CNN backbones on fused Triton and CUDA C++ kernels."""
from . import _triton_env  # noqa: F401  (must run before any Triton kernel is defined)
from ._backend import BACKENDS, backend, get_backend, set_backend
from . import ops
from .registry import ModelInfo, convert, create_model, list_models, model_info
from . import backbones  # noqa: E402  (registers the models; needs ops and registry loaded first)
from .backbones import resnet18, resnet34, resnet50, resnet101, resnet152, vgg16, vgg16_bn, vgg19, vgg19_bn
from .backbones import mobilenet_v2, mobilenetv1_100, mobilenetv1_100h, mobilenetv1_125  # noqa: E402
from .backbones import squeezenet1_0, squeezenet1_1  # noqa: E402
from .backbones import darknet19  # noqa: E402
from .backbones import googlenet, inception_resnet_v2  # noqa: E402
from .backbones import (shufflenet_v1, shufflenet_v1_g3_x0_5, shufflenet_v1_g3_x1_0, shufflenet_v1_g3_x1_5,  # noqa: E402
                        shufflenet_v1_g3_x2_0, shufflenet_v1_g8_x0_5, shufflenet_v1_g8_x1_0, shufflenet_v1_g8_x1_5,
                        shufflenet_v1_g8_x2_0, shufflenet_v2_x0_5, shufflenet_v2_x1_0, shufflenet_v2_x1_5,
                        shufflenet_v2_x2_0)
from .backbones import (efficientnet_b0, efficientnet_b1, efficientnet_b2, efficientnet_b3,  # noqa: E402
                        efficientnet_b4, efficientnet_b5, efficientnet_b6, efficientnet_b7, efficientnet_v2_s,
                        efficientnet_v2_m, efficientnet_v2_l)
from . import weights  # noqa: E402
from .weights import load_checkpoint  # noqa: E402
from .darknet_weights import load_darknet_weights  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BACKENDS", "ModelInfo", "backend", "backbones", "convert", "create_model", "get_backend",
           "list_models", "load_checkpoint", "model_info", "ops", "set_backend", "weights", "__version__",
           "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
           "mobilenet_v2", "mobilenetv1_100", "mobilenetv1_100h", "mobilenetv1_125", "squeezenet1_0",
           "squeezenet1_1"]
__all__ += ["darknet19", "load_darknet_weights"]
__all__ += ["googlenet", "inception_resnet_v2"]
__all__ += ["shufflenet_v1", "shufflenet_v1_g3_x0_5", "shufflenet_v1_g3_x1_0", "shufflenet_v1_g3_x1_5",
            "shufflenet_v1_g3_x2_0", "shufflenet_v1_g8_x0_5", "shufflenet_v1_g8_x1_0", "shufflenet_v1_g8_x1_5",
            "shufflenet_v1_g8_x2_0", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5",
            "shufflenet_v2_x2_0"]
__all__ += ["efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
            "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_s", "efficientnet_v2_m",
            "efficientnet_v2_l"]
