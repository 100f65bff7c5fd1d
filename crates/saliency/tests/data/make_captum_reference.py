# Captum's attributions of a small ReLU network, exported to ONNX, for vulnmap's methods to match.
# usage: python make_captum_reference.py OUT_DIR   (torch, captum, onnx; no GPU needed)
import sys, torch, torch.nn as nn
from captum.attr import GuidedBackprop, InputXGradient, IntegratedGradients
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(0)

class Block(nn.Module):
    def __init__(s, c):
        super().__init__()
        s.c1, s.b1, s.r1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        s.c2, s.b2, s.r2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
    def forward(s, x):
        return s.r2(s.b2(s.c2(s.r1(s.b1(s.c1(x))))) + x)

class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        s.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        s.stem = nn.Sequential(nn.Conv2d(3, 16, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1))
        s.block1, s.block2 = Block(16), Block(16)
        s.head = nn.Linear(16, 10)
    def forward(s, x):
        x = s.block2(s.block1(s.stem((x - s.mean) / s.std)))
        return s.head(x.mean(dim=(2, 3)))

net = Net().eval()
with torch.no_grad():
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1); m.running_var.uniform_(0.5, 1.5)
            m.weight.normal_(1, 0.2); m.bias.normal_(0, 0.2)
x = torch.rand(2, 3, 64, 64)
target = net(x).argmax(1)
torch.onnx.export(net, x[:1], f"{out}/relu_net.onnx", opset_version=17, input_names=["pixels"],
                  output_names=["logits"], dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
save_file({
    "pixels": x.contiguous(),
    "target": target.contiguous(),
    "guided_backprop": GuidedBackprop(net).attribute(x, target=target).contiguous(),
    "input_x_gradient": InputXGradient(net).attribute(x, target=target).contiguous(),
    "integrated_gradients": IntegratedGradients(net).attribute(
        x, baselines=torch.zeros_like(x), target=target, n_steps=16, method="gausslegendre").contiguous(),
}, f"{out}/relu_net_captum.safetensors")
print("captum", __import__("captum").__version__, "torch", torch.__version__, "targets", target.tolist())
