"""The op layer: validated entry points that pick a backend and hand the modules' own tensors to it."""
from .activation import ACTIVATIONS, apply_activation
from .conv import channel_shuffle_map, conv_bias_act, conv_bn_act, conv_bn_act_maxpool, conv_bn_act_tensors
from .conv_multi import conv_bn_act_multi
from .depthwise import depthwise_conv_bn_act, separable_conv_bn_act
from .fire import fire_expand, fire_expand_bias_act
from .pool import adaptive_avg_pool2d, avg_pool2d, global_avg_pool, max_pool2d
from .se import se_gate, se_gate_from_sums, se_gate_from_sums_tensors, se_gate_tensors

__all__ = ["ACTIVATIONS", "adaptive_avg_pool2d", "apply_activation", "avg_pool2d", "channel_shuffle_map", "conv_bias_act", "conv_bn_act",
           "conv_bn_act_maxpool", "conv_bn_act_multi", "conv_bn_act_tensors", "depthwise_conv_bn_act", "fire_expand", "fire_expand_bias_act",
           "global_avg_pool", "max_pool2d", "se_gate", "se_gate_from_sums", "se_gate_from_sums_tensors", "se_gate_tensors",
           "separable_conv_bn_act"]
