# Exports classifiers to ONNX with PyTorch and records PyTorch's logits and input gradients.
# Run on a machine with torch, torchvision, timm, onnx and safetensors, with OUT set to a folder
# and tmp_device/pixels.safetensors holding the shared fixtures' `pixels` (chelsea and coffee,
# 224 x 224). It made this folder's vit_tiny and opzoo_* (whose references were then stripped of
# the pixels, with the gradient stored in f16) and the other models tried (see the crate's tests).
import os, sys, tarfile, traceback, math
import torch, torch.nn as nn, torch.nn.functional as F
from safetensors.torch import load_file, save_file
torch.set_num_threads(16)
OUT = os.environ["OUT"]
work = "/tmp/fx"; os.makedirs(work, exist_ok=True)
pixels224 = load_file("tmp_device/pixels.safetensors")["pixels"].float()
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

class Normalised(nn.Module):
    def __init__(s, net, mean=MEAN, std=STD):
        super().__init__(); s.net = net
        s.register_buffer("mean", mean.clone()); s.register_buffer("std", std.clone())
    def forward(s, x): return s.net((x - s.mean) / s.std)

def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        for name, p in model.named_parameters():
            if p.numel() > 1 and float(p.abs().max()) == 0.0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))

class OpZoo(nn.Module):
    def __init__(s):
        super().__init__()
        s.c1 = nn.Conv2d(3, 8, (1, 7), padding=(0, 3))
        s.c2 = nn.Conv2d(8, 8, (7, 1), padding=(3, 0), bias=False)
        s.gn = nn.GroupNorm(2, 8)
        s.inorm = nn.InstanceNorm2d(8, affine=True)
        s.c3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4)
        s.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        s.bn = nn.BatchNorm2d(32)
        s.ln = nn.LayerNorm(32)
        s.head = nn.Linear(64, 10)
    def forward(s, x):
        x = F.leaky_relu(s.c1(x), 0.1)
        x = s.c2(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        x = s.gn(x)
        x = torch.tanh(x) + F.elu(x) + F.softplus(x)
        x = s.inorm(x)
        x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        x = F.avg_pool2d(x, 3, 2, padding=1, ceil_mode=True, count_include_pad=False)
        x = F.avg_pool2d(x, 2, 1, padding=1, count_include_pad=True)
        x = s.c3(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a * torch.sigmoid(b), torch.maximum(a, b), torch.minimum(a, b), F.hardswish(b)], 1)[:, ::2]
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = F.interpolate(x, size=(20, 20), mode="nearest")
        x = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=True)
        x = s.bn(s.dw(x))
        x = F.gelu(x, approximate="tanh") + F.hardtanh(x, -1.0, 1.0) + F.gelu(x)
        x = (x.abs() + 1).pow(1.5).log() * torch.exp(-x * x) + x / (x.abs() + 2) + torch.sqrt(x * x + 1)
        x = F.pad(x, (0, 1, 2, 0), mode="replicate")
        t = s.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        att = torch.softmax(t.flatten(2), dim=-1).view_as(t)
        pooled = (x * att).sum(dim=(2, 3))
        y = torch.cat([pooled, F.log_softmax(pooled, dim=1) + pooled.mean(dim=1, keepdim=True)], 1)
        return s.head(F.dropout(y, 0.5, training=False))

def models():
    import torchvision.models as tv
    from torchvision.models.swin_transformer import SwinTransformer
    yield "vit_tiny", lambda: tv.VisionTransformer(224, 16, 2, 3, 96, 384, num_classes=10), 224, 17
    for opset in (13, 17, 20):
        yield f"opzoo_opset{opset}", lambda: OpZoo(), 224, opset
    yield "swin_small_config", lambda: SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[1, 1, 2, 1], num_heads=[2, 4, 8, 8], window_size=[7, 7], num_classes=10), 224, 17
    yield "squeezenet1_1", lambda: tv.squeezenet1_1(num_classes=10), 224, 17
    yield "shufflenet_v2_x0_5", lambda: tv.shufflenet_v2_x0_5(num_classes=10), 224, 17
    yield "mnasnet0_5", lambda: tv.mnasnet0_5(num_classes=10), 224, 17
    yield "regnet_x_200mf", lambda: tv.regnet_x_200mf(num_classes=10), 224, 17
    yield "resnext_small", lambda: tv.resnet.ResNet(tv.resnet.Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4, num_classes=10), 224, 17
    yield "maxvit_small_config", lambda: tv.maxvit.MaxVit(input_size=(224, 224), stem_channels=16, partition_size=7, block_channels=[16, 32, 64, 128], block_layers=[1, 1, 1, 1], head_dim=16, stochastic_depth_prob=0.0, num_classes=10), 224, 17
    import timm
    yield "timm_vit_small_config", lambda: timm.models.vision_transformer.VisionTransformer(img_size=224, patch_size=16, embed_dim=96, depth=2, num_heads=3, num_classes=10), 224, 17
    for name in ["test_vit", "test_efficientnet", "test_convnext", "test_byobnet", "mobilevit_xxs", "edgenext_xx_small", "efficientformerv2_s0", "levit_128s", "coat_lite_tiny", "poolformerv2_s12"]:
        def make(name=name):
            return timm.create_model(name, pretrained=False, num_classes=10)
        yield "timm_" + name, make, None, 17

made = []
for i, (name, make, size, opset) in enumerate(models()):
    try:
        torch.manual_seed(i)
        net = make().eval()
        randomise(net, 1000 + i)
        if size is None:
            cfg = getattr(net, "pretrained_cfg", {}) or {}
            size = (cfg.get("input_size") or (3, 224, 224))[-1]
            mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
            std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
            model = Normalised(net, mean, std).eval()
        else:
            model = Normalised(net).eval()
        px = pixels224 if size == 224 else F.interpolate(pixels224, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        path = f"{work}/{name}.onnx"
        torch.onnx.export(model, px[:1], path, opset_version=opset, input_names=["pixels"], output_names=["logits"],
                          dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        x = px.clone().requires_grad_(True)
        logits = model(x)
        target = logits.argmax(1)
        logits.gather(1, target[:, None]).sum().backward()
        save_file({"pixels": px.contiguous(), "logits_eval": logits.detach().contiguous(), "target": target.contiguous(),
                   "grad_pixels_top_logit": x.grad.contiguous()}, f"{work}/{name}_reference.safetensors")
        import onnx
        ops = sorted({n.op_type for n in onnx.load(path).graph.node})
        size_mb = os.path.getsize(path) / 1e6
        print(f"OK {name} opset {opset} size {size} {size_mb:.1f} MB ops {ops}", flush=True)
        if size_mb > 14:
            print(f"  too big to bring back: {name}", flush=True); continue
        made.append(name)
    except Exception as e:
        print(f"FAIL {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)

# Pack into tars of at most ~15 MB.
tars, cur, cur_size = [], [], 0
for name in made:
    s = sum(os.path.getsize(f"{work}/{name}{suf}") for suf in (".onnx", "_reference.safetensors"))
    if cur and cur_size + s > 15e6:
        tars.append(cur); cur, cur_size = [], 0
    cur.append(name); cur_size += s
if cur: tars.append(cur)
for k, names in enumerate(tars[:7]):
    with tarfile.open(f"{OUT}/fixtures{k}.tar", "w") as t:
        for name in names:
            for suf in (".onnx", "_reference.safetensors"):
                t.add(f"{work}/{name}{suf}", arcname=f"{name}{suf}")
    print("packed", k, names, flush=True)
