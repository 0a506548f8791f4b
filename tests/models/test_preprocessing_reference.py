"""Page preprocessing of DeepSeek-OCR v1 and DeepSeek-OCR-2 follows DeepSeek's own rules in every mode.

DeepSeek's rules (its `infer` and `dynamic_preprocess`): v1 Tiny 512 / Small 640 / Base 1024 / Large
1280 draw one view, stretched to the square up to 640 px and padded (aspect kept, centred, grey 127)
above; Gundam pads the page to 1024 px and adds 640 px crops (2..9 in DeepSeek's HF code, 2..6 in its
and vLLM's vLLM scripts) in the grid closest to the page's aspect ratio; DeepSeek-OCR-2 likewise with
a 768 px stretch limit and 768 px crops (2..6). v1 writes a newline token after each row of the global
grid and of the crops' joint grid; OCR-2 does not.

The reference is vLLM's native processor (`DeepseekOCRProcessor`, strategies "v1" and "v2"), an
implementation independent of ours, run inside the vLLM environment by preprocessing_vllm_side.py.
Pixels must agree exactly (assert_allclose with rtol=0, atol=0: same PIL resampling, same float32
arithmetic) and image-token counts must be equal, for every page size and mode. One documented gap:
vLLM's native no-crop path stretches at every size, where DeepSeek's code pads above 640 / 768 px;
for those modes (v1 Base and Large, OCR-2 without crops at 1024 px) our pixels are compared with the
view vLLM's processor pads (its global view, drawn with crops on and the same sizes), and the token
counts with its no-crop path.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DeepseekOcr2Processor
from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import (
    DeepseekOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)

from deepsynth.models import deepseek_ocr2 as ocr2
from deepsynth.models import deepseek_ocr_v1 as v1
from deepsynth.models.tokenizer import build_char_tokenizer
from deepsynth.vllm.parity import vllm_python

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
PAGES = [(1024, 1024), (800, 1100), (1700, 2200), (600, 400), (3000, 500)]
GREY = (127 / 255 - 0.5) / 0.5  # the padding colour after normalisation


def page_image(width: int, height: int) -> Image.Image:
    """A page whose every pixel differs from its neighbours (noise on a gradient), so that any
    difference in resampling, padding or cropping shows."""
    rng = np.random.default_rng(width * 10007 + height)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    noise = rng.integers(-40, 40, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def v1_processor(mode: str, max_crops: int = v1.V1_MAX_CROPS) -> v1.DeepseekOcrV1Processor:
    if mode == "gundam":
        ip = v1.v1_image_processor(v1.V1_GUNDAM_SIZE, "tiles", max_crops=max_crops)
    else:
        ip = v1.v1_image_processor(v1.V1_MODES[mode])
    return v1.DeepseekOcrV1Processor(image_processor=ip, tokenizer=build_char_tokenizer())


def ocr2_processor(crop_mode: str, size: int = ocr2.REAL_PAGE_SIZE) -> DeepseekOcr2Processor:
    """The released processor's settings (as `build_random` makes it), or a `size` px view."""
    ip = DeepseekOcr2ImageProcessorPil(size={"height": size, "width": size})
    processor = DeepseekOcr2Processor(image_processor=ip, tokenizer=build_char_tokenizer())
    ocr2.set_crop_mode(processor, crop_mode)
    return processor


def ours(processor, page: Image.Image) -> dict:
    """Our processor on one page: pixels, image tokens in the prompt, and the formula's count."""
    enc = processor(images=[page], text=["<image>\nFree OCR."], return_tensors="pt")
    crop_mode = ocr2.crop_mode_of(processor)
    return {"global": enc["pixel_values"].numpy(),
            "local": enc["pixel_values_local"].numpy() if "pixel_values_local" in enc else np.zeros((0,)),
            "tokens": int((enc["input_ids"] == processor.image_token_id).sum()),
            "formula": ocr2.image_tokens(processor, *page.size, crop_mode),
            "grid": ocr2.crop_grid(*page.size, *_tile_limits(processor)) if crop_mode == "tiles" else (0, 0)}


def _tile_limits(processor) -> tuple[int, int, int]:
    s = ocr2.effective_image_settings(processor)
    return s["tile_size"], s["min_patches"], s["max_patches"]


# ---- the rules, without vLLM ---------------------------------------------------------------------
@pytest.mark.parametrize("tile,limits", [(640, (2, 9)), (640, (2, 6)), (768, (2, 6))])
def test_crop_grid_is_the_aspect_ratio_rule(tile, limits):
    """Our grid equals transformers' independent implementation of DeepSeek's rule on many pages."""
    rng = np.random.default_rng(tile + limits[1])
    sizes = [*PAGES, *(tuple(int(v) for v in rng.integers(100, 4000, 2)) for _ in range(300)),
             (tile, tile), (tile + 1, tile), (2 * tile, tile), (tile, 3 * tile)]
    for width, height in sizes:
        expected = (0, 0) if max(width, height) <= tile else \
            get_optimal_tiled_canvas((height, width), (tile, tile), *limits)
        assert ocr2.crop_grid(width, height, tile, *limits) == expected, (width, height)


def test_grids_and_token_counts_of_each_mode():
    grids = {(w, h): ocr2.crop_grid(w, h, 640, 2, 9) for w, h in PAGES}
    assert grids == {(1024, 1024): (2, 2), (800, 1100): (2, 3), (1700, 2200): (2, 3), (600, 400): (0, 0),
                     (3000, 500): (6, 1)}
    page = page_image(800, 1100)
    # v1: q x (q + 1) + 1 for one view of q x q tokens (Tiny 8, Small 10, Base 16, Large 20)
    assert {m: ours(v1_processor(m), page)["tokens"] for m in v1.V1_MODES} == \
        {"tiny": 73, "small": 111, "base": 273, "large": 421}
    # Gundam, 2 x 3 crops of 10 x 10 tokens: 273 + (10 x 2 + 1) x 10 x 3
    assert ours(v1_processor("gundam"), page)["tokens"] == 273 + 21 * 30
    # OCR-2: 16 x 16 + 1, and with crops 6 x 12 x 12 more (no newlines)
    assert ours(ocr2_processor("none"), page)["tokens"] == 257
    assert ours(ocr2_processor("tiles"), page)["tokens"] == 257 + 6 * 144


@pytest.mark.parametrize("family,processor,stretched", [
    ("v1", lambda: v1_processor("tiny"), True), ("v1", lambda: v1_processor("small"), True),
    ("v1", lambda: v1_processor("base"), False), ("v1", lambda: v1_processor("large"), False),
    ("ocr2", lambda: ocr2_processor("none", 768), True), ("ocr2", lambda: ocr2_processor("none", 1024), False),
])
def test_no_crop_views_are_stretched_up_to_the_family_limit_and_padded_above(family, processor, stretched):
    white = Image.new("RGB", (3000, 500), (255, 255, 255))
    view = ours(processor(), white)["global"][0]
    side = view.shape[-1]
    if stretched:
        np.testing.assert_array_equal(view, np.ones_like(view))
    else:
        # 3000 x 500 fitted into the square: side / 6 rows of page, centred; grey above and below
        rows = np.flatnonzero((view == 1.0).all(axis=(0, 2)))
        assert len(rows) == pytest.approx(side / 6, abs=2)
        assert abs(rows[0] - (side - rows[-1] - 1)) <= 1
        assert np.allclose(view[:, : rows[0] - 1], GREY) and np.allclose(view[:, rows[-1] + 2:], GREY)


def test_crop_mode_pads_the_global_view_whatever_its_size():
    white = Image.new("RGB", (3000, 500), (255, 255, 255))
    for processor in (v1_processor("gundam"), ocr2_processor("tiles")):
        out = ours(processor, white)
        assert np.allclose(out["global"][0][:, :10], GREY) and np.allclose(out["local"], 1.0)


def test_saved_processors_load_in_plain_transformers_and_get_the_rules_back(tmp_path):
    from transformers import AutoProcessor

    v1_processor("gundam").save_pretrained(tmp_path / "v1")
    saved = json.loads((tmp_path / "v1" / "processor_config.json").read_text()) \
        if (tmp_path / "v1" / "processor_config.json").is_file() else {}
    image_config = saved.get("image_processor") or \
        json.loads((tmp_path / "v1" / "preprocessor_config.json").read_text())
    assert image_config["image_processor_type"] == "DeepseekOcr2ImageProcessorPil"
    loaded = v1.DeepseekOcrV1Processor.from_pretrained(tmp_path / "v1")
    assert type(loaded.image_processor) is v1.DeepseekOcrV1PageImageProcessor
    page = page_image(1700, 2200)
    a, b = ours(v1_processor("gundam"), page), ours(loaded, page)
    assert a["tokens"] == b["tokens"] and np.array_equal(a["local"], b["local"])

    ocr2_processor("tiles").save_pretrained(tmp_path / "ocr2")
    stock = AutoProcessor.from_pretrained(tmp_path / "ocr2")
    assert type(stock.image_processor) is DeepseekOcr2ImageProcessorPil  # plain transformers loads it
    ocr2.set_crop_mode(stock, None)  # what every loader of ours applies
    assert type(stock.image_processor) is ocr2.DeepseekOcrPageImageProcessor


def test_the_vllm_plugin_keeps_a_saved_processors_settings(tmp_path, vllm_plugin_undone):
    """After the plugin's register() (which vLLM runs in its processes, and importing the vLLM
    engine runs here), a saved processor loads with its own settings and DeepSeek's page rules."""
    from transformers import AutoProcessor

    from deepsynth.vllm import register

    ocr2.tiny_processor(256, patch_size=8).save_pretrained(tmp_path)
    register()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.patch_size == 8 and loaded.downsample_ratio == 4
    assert type(loaded.image_processor) is ocr2.DeepseekOcrPageImageProcessor


# ---- against vLLM's native processors --------------------------------------------------------------
PYTHON = vllm_python()
needs_vllm = pytest.mark.skipif(PYTHON is None, reason="the vLLM environment is absent (.venv-vllm): run "
                                                       "`make vllm-env` or set DEEPSYNTH_VLLM_PYTHON")

def _vllm_case(name, image_size, base_size, crop, strategy, max_crops=6):
    return dict(name=name, image_size=image_size, base_size=base_size, crop_mode=crop, strategy=strategy,
                max_crops=max_crops)


# name -> (our processor, vLLM case, vLLM case whose global view is ours when vLLM's no-crop path
# stretches where DeepSeek's code pads)
MODES = {
    "v1-tiny": (lambda: v1_processor("tiny"), _vllm_case("v1-tiny", 512, 512, False, "v1"), None),
    "v1-small": (lambda: v1_processor("small"), _vllm_case("v1-small", 640, 640, False, "v1"), None),
    "v1-base": (lambda: v1_processor("base"), _vllm_case("v1-base", 1024, 1024, False, "v1"),
                _vllm_case("v1-base-padded", 1024, 1024, True, "v1")),
    "v1-large": (lambda: v1_processor("large"), _vllm_case("v1-large", 1280, 1280, False, "v1"),
                 _vllm_case("v1-large-padded", 1280, 1280, True, "v1")),
    # Gundam at vLLM's crop limit (6) and at DeepSeek's HF code's (9, our default)
    "v1-gundam-6": (lambda: v1_processor("gundam", 6), _vllm_case("v1-gundam-6", 640, 1024, True, "v1", 6), None),
    "v1-gundam-9": (lambda: v1_processor("gundam", 9), _vllm_case("v1-gundam-9", 640, 1024, True, "v1", 9), None),
    "ocr2-none-768": (lambda: ocr2_processor("none", 768), _vllm_case("ocr2-none-768", 768, 768, False, "v2"), None),
    "ocr2-none-1024": (lambda: ocr2_processor("none"), _vllm_case("ocr2-none-1024", 1024, 1024, False, "v2"),
                       _vllm_case("ocr2-none-1024-padded", 1024, 1024, True, "v2")),
    "ocr2-tiles": (lambda: ocr2_processor("tiles"), _vllm_case("ocr2-tiles", 768, 1024, True, "v2"), None),
}


@pytest.fixture(scope="module")
def vllm_reference(tmp_path_factory):
    if PYTHON is None:
        pytest.skip("the vLLM environment is absent (.venv-vllm)")
    directory = tmp_path_factory.mktemp("vllm-pages")
    paths = []
    for width, height in PAGES:
        paths.append(str(directory / f"page-{width}x{height}.png"))
        page_image(width, height).save(paths[-1])
    cases = [c for _, case, padded in MODES.values() for c in (case, padded) if c is not None]
    (directory / "job.json").write_text(json.dumps({"pages": paths, "cases": cases}))
    proc = subprocess.run([PYTHON, str(HERE / "preprocessing_vllm_side.py"), str(directory / "job.json"),
                           str(directory)], capture_output=True, text=True, timeout=1200, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return directory, json.loads((directory / "result.json").read_text())


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_pixels_and_image_tokens_equal_vllms_native_processor(vllm_reference, mode):
    directory, result = vllm_reference
    make, case, padded = MODES[mode]
    processor = make()
    for index, (width, height) in enumerate(PAGES):
        where = f"{mode} on a {width} x {height} page"
        got = ours(processor, page_image(width, height))
        theirs = result[f"{case['name']}-{index}"]
        assert got["tokens"] == got["formula"] == theirs["tokens"], where
        grid = tuple(theirs["grid"]) if case["crop_mode"] and max(width, height) > case["image_size"] else (0, 0)
        assert got["grid"] == grid, where
        view_case = padded or case
        expected = np.load(directory / f"{view_case['name']}-{index}-global.npy")
        np.testing.assert_allclose(got["global"], expected, rtol=0, atol=0, err_msg=where)
        if case["crop_mode"] and any(grid):
            local = np.load(directory / f"{case['name']}-{index}-local.npy")
            np.testing.assert_allclose(got["local"], local, rtol=0, atol=0, err_msg=where)
        else:
            assert got["local"].size == 0, where
