"""The vLLM side of tests/models/test_preprocessing_reference.py, run with the vLLM environment's python.

    python tests/models/preprocessing_vllm_side.py JOB.json OUT_DIR

JOB: {"pages": [PNG paths], "cases": [{"name", "image_size", "base_size", "crop_mode", "strategy",
"max_crops"}]}. For every case and page, vLLM's native DeepSeek-OCR / DeepSeek-OCR-2 processor
(`vllm.transformers_utils.processors.deepseek_ocr.DeepseekOCRProcessor`, strategy "v1" or "v2")
draws the page: OUT_DIR/{case}-{page}-global.npy (its `pixel_values`), -local.npy (`images_crop`),
and OUT_DIR/result.json: image tokens, crop grid (`images_spatial_crop`) per case and page.

That processor imports torchvision for `ToTensor`, `Normalize` and `Compose` only; the CPU build of
the vLLM environment has no torchvision, so `_torchvision_stand_in` provides those three (what
torchvision documents them to compute) before the import. Nothing else of torchvision is used.
"""

import json
import sys
import types
from pathlib import Path


def _torchvision_stand_in() -> None:
    import numpy as np
    import torch

    class ToTensor:
        """PIL RGB image -> float32 (channels, height, width) tensor in [0, 1] (x / 255)."""

        def __call__(self, pic):
            array = np.array(pic, dtype=np.uint8, copy=True)
            if array.ndim == 2:
                array = array[:, :, None]
            return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32).div(255)

    class Normalize:
        """(x - mean) / std per channel."""

        def __init__(self, mean, std, inplace=False):
            self.mean, self.std = mean, std

        def __call__(self, tensor):
            mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
            return tensor.sub(mean).div(std)

    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

        def __call__(self, x):
            for t in self.transforms:
                x = t(x)
            return x

    import importlib.machinery

    # transformers decides once, at import, whether torchvision is there: import it first, so that it
    # goes on without torchvision and the stand-in serves only the processor's three transforms.
    import transformers.processing_utils  # noqa: F401

    transforms = types.ModuleType("torchvision.transforms")
    transforms.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
    transforms.ToTensor, transforms.Normalize, transforms.Compose = ToTensor, Normalize, Compose
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    package.__path__ = []
    package.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    sys.modules.setdefault("torchvision", package)
    sys.modules.setdefault("torchvision.transforms", transforms)


def main() -> None:
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        _torchvision_stand_in()
    import numpy as np
    from PIL import Image
    from vllm.transformers_utils.processors.deepseek_ocr import DeepseekOCRProcessor

    from deepsynth.models.tokenizer import build_char_tokenizer

    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    tokenizer = build_char_tokenizer()
    result = {}
    for case in job["cases"]:
        processor = DeepseekOCRProcessor(tokenizer=tokenizer, image_size=case["image_size"],
                                         base_size=case["base_size"], strategy=case["strategy"],
                                         max_crops=case["max_crops"])
        for index, path in enumerate(job["pages"]):
            page = Image.open(path).convert("RGB")
            enc = processor(prompt="<image>\nFree OCR.", images=[page], crop_mode=case["crop_mode"])
            key = f"{case['name']}-{index}"
            np.save(out / f"{key}-global.npy", enc["pixel_values"].numpy())
            np.save(out / f"{key}-local.npy", enc["images_crop"].numpy())
            result[key] = {"tokens": int(enc["num_image_tokens"][0]),
                           "grid": [int(n) for n in enc["images_spatial_crop"][0]]}
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
