"""Test harness for the vLLM side of tests/inference/test_reference_parity.py (vLLM environment):

    python tests/inference/reference_boot.py JOB.json OUT.json

vLLM's native DeepSeek-OCR(-2) modules import torchvision for three image transforms of their
processor (ToTensor, Normalize, Compose); torchvision's PyPI wheels do not import on this CPU
machine, so this harness puts a stand-in with those three into `sys.modules` before vLLM is
imported (after transformers, which must go on seeing no torchvision), registers vLLM's two native
classes in-process (vLLM would inspect them in a fresh subprocess without the stand-in), then runs
the library's vLLM side (`deepsynth.vllm.reference.main`) in-process.
Only the processor's tensor conversion is replaced: what torchvision defines (HWC uint8 -> CHW
float in [0, 1]; (x - mean) / std per channel).
"""

import sys
import types

import numpy as np
import torch


class ToTensor:
    def __call__(self, pic):
        array = np.asarray(pic, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


class Normalize:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, tensor):
        return (tensor - self.mean) / self.std


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, x):
        for transform in self.transforms:
            x = transform(x)
        return x


def install() -> None:
    try:
        import torchvision  # noqa: F401  (a working torchvision needs no stand-in)
        return
    except Exception:  # the wheel is absent or does not import here
        sys.modules.pop("torchvision", None)
    from importlib.machinery import ModuleSpec

    package = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    package.__spec__ = ModuleSpec("torchvision", None, is_package=True)
    transforms.__spec__ = ModuleSpec("torchvision.transforms", None)
    transforms.ToTensor, transforms.Normalize, transforms.Compose = ToTensor, Normalize, Compose
    package.transforms = transforms
    package.__path__ = []
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = package, transforms


if __name__ == "__main__":
    # transformers decides once, at import, whether torchvision is there (and would then import its
    # io module): it is imported first, so that it sees none and only vLLM's processor gets the stand-in
    import transformers.image_utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401

    from deepsynth.vllm.reference import main

    install()
    # vLLM inspects a model class it knows by name in a fresh subprocess, which would not have the
    # stand-in: the two native classes are registered as classes, inspected in this process
    from vllm import ModelRegistry
    from vllm.model_executor.models.deepseek_ocr import DeepseekOCRForCausalLM
    from vllm.model_executor.models.deepseek_ocr2 import DeepseekOCR2ForCausalLM

    ModelRegistry.register_model("DeepseekOCRForCausalLM", DeepseekOCRForCausalLM)
    ModelRegistry.register_model("DeepseekOCR2ForCausalLM", DeepseekOCR2ForCausalLM)
    main(sys.argv[1:])
