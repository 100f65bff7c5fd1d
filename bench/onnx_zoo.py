"""Checks that torchvision's and timm's image classifiers, exported as a user would, load and
classify in vulnmap as in PyTorch: each model (random weights, seed 0) is exported at opset 17
with a dynamic batch axis, and `vulnmap classify --json` on one random-pixel PNG of the model's
input size must give PyTorch's probabilities for its top five classes.

usage: python onnx_zoo.py --vulnmap target/release/vulnmap [--out DIR] [MODEL ...]

MODEL is a torchvision name (`resnet18`) or `timm:NAME`; without any, the lists below. Prints a
line per model: whether the top five classes agree (random weights often tie, where the order
may differ: "up to ties") and the largest relative difference of the five probabilities. Not a test: it needs
PyTorch, timm and minutes; the test suite checks the fixtures of ../shared/fixtures/onnx.
"""
import argparse
import json
import os
import subprocess
import time

import numpy as np
import torch
import torchvision
from PIL import Image

TORCHVISION = ["resnet18", "resnext50_32x4d", "wide_resnet50_2", "alexnet", "vgg11_bn", "squeezenet1_1",
               "densenet121", "googlenet", "inception_v3", "mobilenet_v2", "mobilenet_v3_large",
               "mnasnet0_5", "shufflenet_v2_x0_5", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf",
               "regnet_y_400mf", "convnext_tiny", "vit_b_16", "swin_t", "maxvit_t"]
TIMM = ["resnet50d", "resnetv2_50", "cspresnet50", "dla34", "efficientnet_b0", "tf_efficientnet_b0",
        "mobilenetv3_large_100", "ghostnet_100", "rexnet_100", "regnetx_002", "convnext_atto",
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "mixer_s16_224", "efficientformer_l1", "levit_128s",
        "poolformer_s12", "coatnet_0_rw_224", "edgenext_xx_small", "mobilevit_xxs"]


def build(name):
    """The model in eval mode and its input size."""
    if name.startswith("timm:"):
        import timm
        return timm.create_model(name[5:], pretrained=False).eval(), 224
    extra = dict(aux_logits=False, init_weights=True) if name in ("googlenet", "inception_v3") else {}
    size = 299 if name == "inception_v3" else 224
    return getattr(torchvision.models, name)(weights=None, **extra).eval(), size


def check(name, vulnmap, out_dir):
    torch.manual_seed(0)
    net, size = build(name)
    path = os.path.join(out_dir, name.replace(":", "_") + ".onnx")
    if not os.path.exists(path):
        torch.onnx.export(net, torch.rand(1, 3, size, size), path, opset_version=17, input_names=["pixels"],
                          output_names=["logits"], dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
    # An image of exactly the input size: vulnmap's resize and crop leave it as it is.
    image = os.path.join(out_dir, f"random_{size}.png")
    if not os.path.exists(image):
        pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image)
    x = torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        p = torch.softmax(net(x), -1)[0]
    start = time.time()
    run = subprocess.run([vulnmap, "classify", "--model", path, "--resize", str(size), "--json", "--top", "5", "-q",
                          image], capture_output=True, text=True)
    seconds = time.time() - start
    if run.returncode != 0:
        return f"{name}: ERROR {run.stderr.strip()[:500]}"
    ours = [(e["class"], e["probability"]) for e in json.loads(run.stdout.splitlines()[0])["top"]]
    worst = max(abs(q - p[c].item()) / max(p[c].item(), 1e-12) for c, q in ours)
    theirs = torch.topk(p, 5)
    if [c for c, _ in ours] == theirs.indices.tolist():
        verdict = "agree"
    elif all(abs(q - t) <= 1e-4 * t for (_, q), t in zip(ours, theirs.values.tolist())):
        verdict = "agree up to ties"  # random weights: classes of equal probability
    else:
        verdict = "DIFFER"
    return f"{name}: top five {verdict}, largest relative probability difference {worst:.1e} ({seconds:.1f} s)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vulnmap", required=True, help="the vulnmap binary")
    parser.add_argument("--out", default="target/onnx-zoo", help="where the exports and the image go")
    parser.add_argument("models", nargs="*")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    for name in args.models or TORCHVISION + ["timm:" + m for m in TIMM]:
        try:
            print(check(name, args.vulnmap, args.out), flush=True)
        except Exception as e:  # a model this PyTorch or timm cannot build or export
            print(f"{name}: not exported ({type(e).__name__}: {str(e)[:300]})", flush=True)


if __name__ == "__main__":
    main()
