"""PyTorch's side of `cargo xtask bench`: the same measurements as vulnmap-bench, on the same
shapes, written as a PyTorch user would (eager mode, torchvision's ResNet50, the paper's
generator as nn.Sequential, one generator per image or window in a Python loop as the authors'
code). Prints JSON on stdout.

usage: python torch_reference.py [--quick] [--device cpu|cuda] [--onnx-dir DIR]

With --onnx-dir, also exports each ONNX family (ResNet50 and the six torchvision families of
../shared/fixtures/onnx, random weights, normalisation inside, dynamic batch) into DIR and times
its forward + input gradient in eager PyTorch, each family in a fresh process.

Peak memory on the CPU is the resident memory a call adds at its highest: the kernel's high-water
mark, reset before the timed runs (/proc/self/clear_refs), above the resident set before them,
comparable with vulnmap's bytes live above what was live before the call.
"""
import argparse
import ctypes
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")


def reset_peak():
    """Returns freed heap memory to the system (so that reuse of memory cached by earlier calls
    cannot hide a call's need) and resets the resident high-water mark; returns the resident set
    now (None off Linux)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return None


def peak_since(base, dev):
    """Most memory held during the calls since reset_peak() returned `base`."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated()
    if base is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(0, _status_bytes("VmHWM") - base)


def paper_generator():
    layers = [(100, 2048, 4, 1, 0), (2048, 1024, 4, 2, 1), (1024, 512, 4, 1, 1), (512, 256, 4, 3, 1),
              (256, 128, 4, 2, 1), (128, 64, 8, 2, 1), (64, 3, 12, 2, 1)]
    return build(layers, None)


def generic_generator(size):
    d = 0
    while 4 << d < size:
        d += 1
    ch = lambda i: min(max(64 << (d - 1 - i), 64), 256)
    layers = [(100, ch(0), 4, 1, 0)] + [(ch(i - 1), ch(i), 4, 2, 1) for i in range(1, d)]
    layers.append((ch(d - 1), 3, 4, 2, 1))
    return build(layers, size)


def build(layers, crop):
    mods = []
    for k, (cin, cout, kernel, stride, pad) in enumerate(layers):
        mods.append(nn.ConvTranspose2d(cin, cout, kernel, stride, pad, bias=False))
        mods.append(nn.BatchNorm2d(cout) if k + 1 < len(layers) else nn.Tanh())
        if k + 1 < len(layers):
            mods.append(nn.ReLU())
    net = nn.Sequential(*mods)
    if crop is None:
        return net

    class Cropped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, z):
            y = self.net(z)
            top = (y.shape[2] - crop) // 2
            return y[:, :, top:top + crop, top:top + crop]

    return Cropped()


# The ONNX rows: (name, builder, batch sizes). The small configurations are the shared fixtures'.
def onnx_families():
    from torchvision.models import resnet, densenet, efficientnet, convnext, vision_transformer
    conf, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.5, depth_mult=0.5)
    cn = convnext.CNBlockConfig
    return [
        ("resnet50", lambda: torchvision.models.resnet50(), [1, 8, 16]),
        ("resnet_basic_1111", lambda: resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1]), [1, 16]),
        ("densenet_small_config", lambda: densenet.DenseNet(16, (2, 3, 4, 3), 32), [1, 16]),
        ("efficientnet_b0_half", lambda: efficientnet.EfficientNet(conf, 0.2, last_channel=last), [1, 16]),
        ("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(), [1, 16]),
        ("convnext_small_config", lambda: convnext.ConvNeXt([cn(24, 48, 1), cn(48, 96, 1), cn(96, 192, 2), cn(192, None, 1)]), [1, 16]),
        ("vit_small_config", lambda: vision_transformer.VisionTransformer(224, 16, 4, 3, 192, 768), [1, 16]),
        # The same ViT as timm writes it (its Attention module, exported differently), when timm
        # is installed.
        ("timm_vit_small_config", lambda: __import__("timm").models.vision_transformer.VisionTransformer(
            img_size=224, patch_size=16, embed_dim=192, depth=4, num_heads=3, mlp_ratio=4.0), [1, 16]),
        # EfficientNet-Lite0 (timm's, random weights), when timm is installed: also the
        # PyTorch side of vulnmap's native Lite0 rows.
        ("efficientnet_lite0", lambda: __import__("timm").create_model("efficientnet_lite0"), [1, 16]),
    ]


def onnx_family(name, out_dir, dev, repeats, min_seconds):
    """Exports family `name` to out_dir/onnx-NAME.onnx and times its forward, forward + input
    gradient and SmoothGrad-25 (nothing when the family's library is not installed)."""
    builder, batches = {n: (b, bs) for n, b, bs in onnx_families()}[name]
    try:
        builder()
    except ImportError:
        return []
    torch.manual_seed(0)
    net = builder().eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    class Normalised(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)

        def forward(self, x):
            return self.net((x - self.mean) / self.std)

    model = Normalised().eval()
    path = os.path.join(out_dir, f"onnx-{name}.onnx")
    if not os.path.exists(path):
        torch.onnx.export(model, torch.rand(1, 3, 224, 224), path, opset_version=17, input_names=["pixels"],
                          output_names=["logits"], dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
    model = model.to(dev)
    for p_ in model.parameters():
        p_.requires_grad_(False)
    out = []

    def timed(f):
        t = time.perf_counter()
        f()
        reps = max(repeats, min(15, math.ceil(min_seconds / max(time.perf_counter() - t, 1e-6))))
        times = []
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = reset_peak()
        for _ in range(reps):
            t = time.perf_counter()
            f()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times), peak_since(base, dev)

    def add(row, n, timing, note):
        t, peak = timing
        for prefix in ["onnx"] + (["native"] if name == "efficientnet_lite0" else []):
            out.append({"name": f"{prefix}-{name}/{row}", "batch": n, "seconds": t, "seconds_per_image": t / n,
                        "peak_bytes": peak, "note": note + " (eager PyTorch)"})

    for n in batches:
        x = torch.rand(n, 3, 224, 224, device=dev)
        with torch.no_grad():
            add("forward", n, timed(lambda: model(x)), "logits of N images")

        def grad():
            xr = x.clone().requires_grad_(True)
            model(xr)[:, 0].sum().backward()
            return xr.grad
        add("forward+input-gradient", n, timed(grad), "gradient of one logit per image w.r.t. the pixels")
    x = torch.rand(1, 3, 224, 224, device=dev)

    def smoothgrad():
        noisy = (x + 0.15 * (x.max() - x.min()) * torch.randn(25, 3, 224, 224, device=dev)).requires_grad_(True)
        model(noisy)[:, 0].sum().backward()
        return noisy.grad.mean(0)
    add("smoothgrad", 1, timed(smoothgrad), "25 noisy samples in one batch")
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--onnx-dir")
    p.add_argument("--onnx-family")
    p.add_argument("--only", default="")
    p.add_argument("--list-onnx-families", action="store_true")
    a = p.parse_args()
    if a.list_onnx_families:
        print(json.dumps([name for name, _, _ in onnx_families()]))
        return
    wanted = lambda name: name.startswith(a.only)
    dev = torch.device(a.device)
    if a.onnx_family:
        print(json.dumps(onnx_family(a.onnx_family, a.onnx_dir, dev, 3, 1.0)))
        return
    min_seconds = 0.0 if a.quick else 1.0
    if a.quick:
        size, batches, samples, attack_n, window, stride, local_iters, repeats = 64, [1, 2], 4, 2, 32, 32, 2, 1
    else:
        size, batches, samples, attack_n, window, stride, local_iters, repeats = 224, [1, 8, 32], 25, 8, 100, 50, 5, 3
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().to(dev)
    for p_ in model.parameters():
        p_.requires_grad_(False)
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1)
    classify = lambda x: model((x - mean) / std)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(f, reps=repeats):
        # As vulnmap-bench: short calls repeat until about a second is timed (at most 15 runs).
        t = time.perf_counter()
        f()
        sync()
        reps = max(reps, min(15, math.ceil(min_seconds / max(time.perf_counter() - t, 1e-6))))
        times = []
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = reset_peak()
        for _ in range(reps):
            t = time.perf_counter()
            f()
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times), peak_since(base, dev)

    out = []

    def add(name, n, seconds, peak, note):
        out.append({"name": name, "batch": n, "seconds": seconds, "seconds_per_image": seconds / n,
                    "peak_bytes": peak, "note": note})

    for n in batches if wanted("forward") else []:
        x = torch.rand(n, 3, size, size, device=dev)
        with torch.no_grad():
            t, m = timed(lambda: classify(x))
        add("forward", n, t, m, "logits of N images (no_grad)")

        def grad():
            xr = x.clone().requires_grad_(True)
            classify(xr)[:, 0].sum().backward()
            return xr.grad
        t, m = timed(grad)
        add("forward+input-gradient", n, t, m, "gradient of one logit per image w.r.t. the pixels")

    x = torch.rand(1, 3, size, size, device=dev)

    def smoothgrad():
        sigma = 0.15 * (x.max() - x.min())
        noisy = (x + sigma * torch.randn(samples, 3, size, size, device=dev)).requires_grad_(True)
        classify(noisy)[:, 0].sum().backward()
        return noisy.grad.mean(0)
    t, m = timed(smoothgrad) if wanted("smoothgrad") else (None, None)
    if t is not None:
        add("smoothgrad", 1, t, m, f"{samples} noisy samples in one batch")

    def make(gen):
        g = gen().to(dev).train()
        return g, torch.randn(1, 100, 1, 1, device=dev), torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))

    xs = torch.rand(attack_n, 3, size, size, device=dev)
    with torch.no_grad():
        labels = classify(xs).argmax(1)
    gens = [make(paper_generator if size == 224 else lambda: generic_generator(size))
            for _ in range(attack_n if wanted("attack-iteration") else 0)]

    def attack_step():
        for i, (g, z, opt) in enumerate(gens):
            opt.zero_grad()
            x_adv = (xs[i:i + 1] + 0.02 * g(z)).clamp(0, 1)
            (-F.cross_entropy(classify(x_adv), labels[i:i + 1])).backward()
            opt.step()
    t, m = timed(attack_step) if wanted("attack-iteration") else (None, None)
    if t is not None:
        add("attack-iteration", attack_n, t, m, "one generator update per image: generator, classifier, backward, Adam (a loop over images)")

    # vulnmap's window grid: every `stride` while the window fits, plus one flush with the far
    # edge when pixels there would be left uncovered (16 windows for 100/50 on 224, not 9).
    offsets = list(range(0, size - window + 1, stride))
    if offsets[-1] + window < size:
        offsets.append(size - window)
    corners = [(top, left) for top in offsets for left in offsets]

    def local_map():
        label = classify(x).argmax(1)
        for top, left in corners:
            g, z, opt = make(lambda: generic_generator(window))
            # As vulnmap's engine: judge the perturbed image after every update, the last included.
            for k in range(local_iters + 1):
                noise = F.pad(g(z), (left, size - left - window, top, size - top - window))
                x_adv = (x + 0.02 * noise).clamp(0, 1)
                logits = classify(x_adv)
                probs = logits.softmax(1)
                if bool(probs.max(1).values > 1 - 1e-9) and bool(probs.argmax(1) != label) or k == local_iters:
                    break
                opt.zero_grad()
                (-F.cross_entropy(logits, label)).backward()
                opt.step()
    t, m = timed(local_map, min(repeats, 2)) if wanted("local-attack-map") else (None, None)
    if t is not None:
        add("local-attack-map", 1, t, m, f"w = {window}, s = {stride} ({len(corners)} windows), {local_iters} updates per window, a loop over windows")
    if a.onnx_dir and not a.quick:
        os.makedirs(a.onnx_dir, exist_ok=True)
        for name, _, _ in onnx_families():
            if not wanted(f"onnx-{name}"):
                continue
            child = subprocess.run([sys.executable, __file__, "--device", a.device, "--onnx-dir", a.onnx_dir,
                                    "--onnx-family", name], capture_output=True, text=True, check=True)
            out.extend(json.loads(child.stdout.strip().splitlines()[-1]))
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(dev), "measurements": out}, indent=1))


if __name__ == "__main__":
    main()
