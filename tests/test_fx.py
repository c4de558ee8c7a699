"""torch.fx symbolic tracing of every fastbone model (issue 13, part 1): the op layer's entry points
are leaf calls, the traced GraphModule computes what the model computes, and torchvision's
create_feature_extractor taps the same maps as the reference's (or as features_only's)."""
import fastbone  # isort: skip

import pytest
import torch
import torch.fx
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from fastbone._fx import fx_leaf
from fastbone.verify import randomize_batchnorm
from helpers import rel_err

TRACEABLE_SIZES = {"inception_resnet_v2": 75}  # its smallest valid input; 64 elsewhere


def _model(name):
    model = fastbone.create_model(name).eval()
    randomize_batchnorm(model, input_size=TRACEABLE_SIZES.get(name, 32))
    return model


def _input(name):
    size = TRACEABLE_SIZES.get(name, 64)
    return torch.randn(1, 3, size, size)


@pytest.mark.parametrize("name", fastbone.list_models())
def test_symbolic_trace_computes_the_model(name):
    model, x = _model(name), _input(name)
    graph = torch.fx.symbolic_trace(model)
    leaves = [n for n in graph.graph.nodes if n.op == "call_function" and hasattr(n.target, "__wrapped__")]
    assert leaves, "the fastbone calls should be leaf nodes of the graph"
    with torch.no_grad():  # the CPU default (torch) backend: the structure is what is checked here
        assert rel_err(graph(x), model(x)) < 1e-6


@pytest.mark.parametrize("name", fastbone.list_models())
def test_create_feature_extractor_taps_any_node(name):
    """Nodes spread over the eval graph, the last one included: the extractor runs, each tapped map
    is a tensor of the graph, and the last equals the model's own output."""
    model, x = _model(name), _input(name)
    train_nodes, eval_nodes = get_graph_node_names(model)
    picked = sorted({eval_nodes[i] for i in torch.linspace(1, len(eval_nodes) - 1, 5).long().tolist()},
                    key=eval_nodes.index)
    # Train mode runs the torch modules (other nodes): each mode gets its own return nodes.
    extractor = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=picked)
    extractor.eval()
    with torch.no_grad():
        tapped = extractor(x)
        expected = model(x)
    assert list(tapped) == picked
    # A node is a tensor, or a tuple of them (the depthwise op with the SE pool returns (map, partial sums)).
    leaves = torch.utils._pytree.tree_leaves(list(tapped.values()))
    assert leaves and all(isinstance(t, torch.Tensor) and torch.isfinite(t).all() for t in leaves)
    assert rel_err(tapped[picked[-1]], expected) < 1e-6


def test_feature_extractor_agrees_with_torchvisions_on_resnet50():
    import torchvision
    reference = torchvision.models.resnet50().eval()
    randomize_batchnorm(reference)
    model = fastbone.convert(reference)
    nodes = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), fastbone.backend("triton"):
        ours = create_feature_extractor(model, return_nodes=nodes)(x)
    with torch.no_grad():
        theirs = create_feature_extractor(reference.double(), return_nodes=nodes)(x.double())
    for key in nodes.values():
        assert rel_err(ours[key], theirs[key]) < 1e-5, key


def _block_outputs(model, node_names) -> list[str]:
    """Blocks (module paths up to three deep that prefix or name some node of the graph, containers left out:
    their last node need not be their output where fastbone runs a fused call outside their scope), in graph
    order: what create_feature_extractor accepts as "this block's output"."""
    modules = dict(model.named_modules())
    found = []
    for node in node_names:
        parts = node.split(".")
        for i in range(1, min(len(parts) + 1, 4)):
            prefix = ".".join(parts[:i])
            module = modules.get(prefix)
            if module is not None and not isinstance(module, (torch.nn.Sequential, torch.nn.ModuleList)) \
                    and prefix not in found:
                found.append(prefix)
    return found


# One model per family. VGG, SqueezeNet and DarkNet-19 run fused calls of the network itself; each carries
# the reference's node name of the layer whose output it computes (VGG's conv + ReLU is `features.15`, the
# ReLU's), so the reference's names tap the same maps; a conv's own output before its fused activation has
# no node (it never exists), and asking for it is refused by name.
# (EfficientNetV2 shares B0's blocks and adds FusedMBConv; with verify's random statistics its 40+ residual
# blocks amplify float32 rounding to 1e-2, tests/test_efficientnet_v2.py compares it with milder ones.)
AGREEMENT_MODELS = ["mobilenet_v2", "mobilenetv1_100", "efficientnet_b0", "shufflenet_v2_x0_5",
                    "shufflenet_v1_g3_x0_5", "googlenet", "inception_resnet_v2", "resnet18", "vgg16_bn",
                    "squeezenet1_1", "darknet19"]


@pytest.mark.parametrize("name", AGREEMENT_MODELS)
def test_feature_extractor_agrees_with_the_reference(name):
    """The same return nodes (block outputs named as in the reference) give the same maps from fastbone's
    model and from its reference with the same weights."""
    from fastbone.registry import model_info

    reference = model_info(name).reference_builder().eval()
    randomize_batchnorm(reference, input_size=TRACEABLE_SIZES.get(name, 64))
    model = fastbone.create_model(name).eval()
    model.load_state_dict(reference.state_dict())
    ours = set(_block_outputs(model, get_graph_node_names(model)[1]))
    common = [p for p in _block_outputs(reference, get_graph_node_names(reference)[1]) if p in ours]
    nodes = [common[i] for i in sorted({round(i) for i in torch.linspace(0, len(common) - 1, 4).tolist()})]
    assert len(nodes) >= 2, common
    x = _input(name)
    with torch.no_grad():
        got = create_feature_extractor(model, return_nodes=nodes)(x)
        want = create_feature_extractor(reference.double(), return_nodes=nodes)(x.double())
    for node in nodes:
        assert got[node].shape == want[node].shape, node
        assert rel_err(got[node], want[node]) < 1e-4, node


def test_vgg_perceptual_loss_taps_agree_with_torchvisions():
    """The ReLU outputs a perceptual loss taps (relu1_2, relu2_2, relu3_3, relu4_3: features.3 / 8 / 15 / 22 of
    vgg16), the pool after one of them and the hidden layers' output, from fastbone's fused graph and from
    torchvision's; the conv before its fused ReLU is refused by name (it never exists)."""
    import torchvision
    reference = torchvision.models.vgg16().eval()
    model = fastbone.convert(reference)
    nodes = ["features.3", "features.8", "features.15", "features.16", "features.22", "classifier.5"]
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad(), fastbone.backend("triton"):
        got = create_feature_extractor(model, return_nodes=nodes)(x)
    with torch.no_grad():
        want = create_feature_extractor(reference.double(), return_nodes=nodes)(x.double())
    for node in nodes:
        assert got[node].shape == want[node].shape, node
        assert rel_err(got[node], want[node]) < 1e-5, node
    with pytest.raises(ValueError, match="features.14"):
        create_feature_extractor(model, return_nodes=["features.14"])


def test_fx_leaf_passes_real_calls_through_and_records_traced_ones():
    calls = []

    @fx_leaf
    def scaled(x, factor):
        calls.append(factor)
        return x * factor

    class Tiny(torch.nn.Module):
        def forward(self, x):
            return scaled(x, 3.0) + 1

    x = torch.randn(4)
    assert torch.equal(scaled(x, 2.0), x * 2.0) and calls == [2.0]
    graph = torch.fx.symbolic_trace(Tiny())
    assert calls == [2.0]  # tracing records the call without running it
    assert [n.target for n in graph.graph.nodes if n.op == "call_function"][0] is scaled
    assert torch.equal(graph(x), x * 3.0 + 1) and calls == [2.0, 3.0]
