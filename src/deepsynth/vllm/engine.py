"""`VLLMEngine`: the `InstructionEngine` API (and the server's `Engine` interface) with vLLM generating.

Documents are read, rendered, limited and cached by the `DocumentPreparer` the HF engine uses too
(`deepsynth.inference.prepare`; the engine holds one); generation goes through vLLM's offline
`LLM`: requests from every caller (the server's batcher, streams, `ask_batch`) are fed to one `LLM`
by one driver thread (`deepsynth.vllm.driver`), so vLLM batches them continuously.

What a request is answered with comes from the model bundle, as for the HF engine:

* decoding defaults from generation_config.json (greedy unless it says otherwise);
* the loop guards of `deepsynth.models.generate.Decoder` (n-gram blocking over prompt + answer,
  the image token suppressed, the loop stop that keeps one copy of a repeated tail) through one
  vLLM logits processor (`deepsynth.vllm.guards`), so that in float32 greedy decoding the
  answers equal the HF engine's token for token (`deepsynth check-parity`);
* LoRA adapters (an adapter bundle as `model`, or `adapter=`) are served as a vLLM LoRA module on
  the unmerged base;
* structured output: `json_schema` goes to vLLM's structured outputs; an answer the token budget
  cut is closed as the HF engine closes it.

Models: the tiny DeepSeek-OCR-2 checkpoints (and any image-text-to-text model transformers knows)
go through vLLM's Transformers backend, with the project's plugin (`deepsynth.vllm`);
a checkpoint in vLLM's own DeepSeek-OCR-2 layout (`deepsynth export-vllm`) goes through vLLM's
native class. Pages are drawn as the HF engine draws them (DeepSeek's page rules: stretched or
padded views, the bundle's crop settings); local crops are not served by the Transformers backend,
so a page that "tiles" mode would cut into crops is refused (pages up to a tile are served).
DeepSeek's own DeepSeek-OCR-2 layout is converted once into the cache as `load_bundle` converts
it (`deepsynth.vllm.checkpoint`, where vLLM loads a model from); DeepSeek-OCR v1 is not served.

vLLM is not a dependency of the project's main environment: `make vllm-env` builds .venv-vllm,
and this module imports only there. `python -m deepsynth.vllm.parity REQUESTS OUT` answers a JSON
file of requests with token ids through this engine (what check-parity and the tests run there).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from deepsynth.inference.documents import Document, DocumentError, clean_text
from deepsynth.inference.interface import Answer, EngineBase
from deepsynth.inference.prepare import DocumentPreparer, PreparedDocument
from deepsynth.models.bundle import (BundleError, ModelSource, ModelSpec, generation_defaults, make_collator,
                                     resolve_render)
from deepsynth.models.generate import GenerationSettings, _answer_row
from deepsynth.models.loops import LoopPolicy, find_loop
from deepsynth.models.structured import SchemaError, check_schema, close_text
from deepsynth.vllm import register
from deepsynth.vllm.checkpoint import (ResolvedModel, native_layout, resolve_model, vllm_adapter, vllm_hf_overrides,
                                       vllm_lora_rank, vllm_processor_kwargs)
from deepsynth.vllm.driver import Driver, Request, raise_if_failed, wait

# The plugin's processor back-ports apply to this process too (the HF side of check-parity and the
# processor that counts image tokens run here, not only in vLLM's processes).
register()

logger = logging.getLogger(__name__)

__all__ = ["VLLMEngine", "VLLMOptions"]

KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"


@dataclass
class VLLMOptions:
    """How the vLLM engine is started (fields map onto `vllm.LLM` arguments)."""

    # Weights' dtype: "auto" (the checkpoint's), "float32" (bit-exact parity with the HF engine on
    # CPU; bf16 drifts after a few dozen tokens), "bfloat16", "float16".
    dtype: str = "auto"
    # Whole GiB vLLM reserves for the KV cache on CPU (VLLM_CPU_KVCACHE_SPACE, which vLLM reads as
    # an integer); None keeps the environment's value or vLLM's default.
    kv_cache_gib: int | None = None
    # Longest prompt + answer in tokens; None = the model's max_position_embeddings.
    max_model_len: int | None = None
    # Requests decoded together at most (vLLM's max_num_seqs).
    max_num_seqs: int = 64
    # Pages (images) one request may carry.
    max_pages: int = 16
    # Skip torch.compile / graph capture: minutes of start-up on a CPU for a small gain.
    enforce_eager: bool = True
    # "transformers", "vllm" (native class) or None (chosen from the checkpoint, see `resolve_model`).
    model_impl: str | None = None
    # Library behind schema-constrained answers: "xgrammar" (vLLM's default; refuses a few schema
    # combinations, which `check_json_schema` turns into a SchemaError) or "guidance" (llguidance:
    # wider JSON-schema coverage; it cannot read the tiny models' character tokenizer). Either
    # writes compact JSON: with free whitespace small models spend the budget on spaces.
    structured_backend: str = "xgrammar"
    # Any further `vllm.LLM` keyword arguments.
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.structured_backend not in ("guidance", "xgrammar"):
            raise ValueError(f"structured_backend must be 'guidance' or 'xgrammar', got {self.structured_backend!r}")


def vllm_prompt(spec: ModelSpec, processor, pages: Sequence[Image.Image], instruction: str) -> dict:
    """The prompt dict for vLLM of `pages` + `instruction`: prompt text, or for a layout whose BOS is
    ours (plain) the token ids with one image token per page, since vLLM's tokenizer call on text would
    add a BOS or not as the tokenizer's settings say; vLLM expands each page's image token as it would
    in text."""
    builder = spec.prompt_builder
    text = builder(processor, len(pages), instruction)
    images = {"image": list(pages) if len(pages) > 1 else pages[0]}
    if builder.bos:
        return {"prompt_token_ids": builder.encode(processor.tokenizer, text), "multi_modal_data": images}
    return {"prompt": text, "multi_modal_data": images}


class VLLMEngine(EngineBase):
    """Answers instructions about documents with vLLM (same answers and fields as `InstructionEngine`;
    implements `deepsynth.inference.interface.Engine`).

    model:          anything `resolve_model` takes (directory, adapter bundle, shipped name, preset, ...),
                    by name or as `resolve_source` resolved it (a command that resolved it once already).
    render_preset:  override of the bundle's render config (logged when it differs).
    adapter:        LoRA adapter directory served on `model` as a vLLM LoRA module (not merged).
    cache_pages:    pages the document cache may hold (0 turns it off); vLLM keeps its own caches
                    of processed images, encoder outputs and prompt prefixes.
    generation:     default generation settings (None = the bundle's generation_config.json).
    max_batch_size: requests handed to vLLM together by `ask_batch` (vLLM batches across callers).
    loop_policy:    override of the bundle's loop-stop policy.
    options:        how vLLM is started (`VLLMOptions`).
    """

    engine_name = "vllm"

    @property
    def concurrency(self) -> int:
        """vLLM schedules every request it holds together, up to max_num_seqs."""
        return self.options.max_num_seqs

    def __init__(self, model: str | ModelSource = "tiny-reader", render_preset: str | None = None,
                 adapter: str | None = None, cache_pages: int = 256, generation: GenerationSettings | None = None,
                 max_batch_size: int = 64, loop_policy: LoopPolicy | None = None,
                 options: VLLMOptions | None = None) -> None:
        if not isinstance(model, (str, ModelSource)):
            raise TypeError("VLLMEngine loads a model by name or directory, or as `resolve_source` resolved it "
                            f"(vLLM reads the weights from disk); got {type(model).__name__}")
        self.options = options or VLLMOptions()
        found = resolve_model(model, adapter)
        self._temporary = found.temporary
        name = model.name if isinstance(model, ModelSource) else model
        if found.spec.instruction_channel.get("kind") != "prompt":
            raise BundleError(f"{name}: the vLLM engine serves instructions given as prompt text; this model "
                              "reads them through a text encoder (use the HF engine)")
        self.name, self.spec, self.processor = name, found.spec, found.processor
        self.tokenizer = self.processor.tokenizer
        self.loop_policy = loop_policy or self.spec.loop_policy()
        self.generation = generation or generation_defaults(found.generation_dir)
        self.max_batch_size = max_batch_size
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(found.path)
        self.image_token_id = getattr(config, "image_token_id", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        max_positions = self.options.max_model_len or getattr(text_config, "max_position_embeddings", None)
        # vLLM builds the prompts it runs; the collator here only counts the image tokens of a
        # document's pages, by the same processor expansion (no model: no text-encoder channel).
        self.documents = DocumentPreparer(self.spec, self.processor, make_collator(None, self.processor, self.spec),
                                          resolve_render(self.spec, render_preset), self.image_token_id,
                                          max_positions, cache_pages)
        self.cache = self.documents.cache
        self.render_config = self.documents.render_config
        self.lora_path = found.lora
        if found.lora is not None:
            served, tmp = vllm_adapter(found.lora, getattr(config, "model_type", None))
            found = dataclasses.replace(found, lora=served)
            if tmp is not None:
                self._temporary.append(tmp)
        self._images_kwargs = vllm_processor_kwargs(self.processor)
        self._hf_overrides = vllm_hf_overrides(config)
        self.llm = self._start(found)
        self._lora_request = None
        if found.lora is not None:
            from vllm.lora.request import LoRARequest

            self._lora_request = LoRARequest("adapter", 1, found.lora)
        self._driver = Driver(self.llm)

    def _start(self, found: ResolvedModel):
        from vllm import LLM

        from deepsynth.vllm.guards import DeepsynthGuards

        opts = self.options
        if opts.kv_cache_gib is not None:
            if int(opts.kv_cache_gib) != opts.kv_cache_gib or opts.kv_cache_gib < 1:
                raise ValueError(f"kv_cache_gib must be a whole number of GiB >= 1, got {opts.kv_cache_gib}")
            os.environ[KV_CACHE_ENV] = str(int(opts.kv_cache_gib))
        impl = opts.model_impl or ("vllm" if native_layout(found.path) else "transformers")
        kwargs = dict(model=found.path, tokenizer=found.path, dtype=opts.dtype, model_impl=impl,
                      max_num_seqs=opts.max_num_seqs, enforce_eager=opts.enforce_eager,
                      logits_processors=[DeepsynthGuards], limit_mm_per_prompt={"image": opts.max_pages},
                      # vLLM reads the whitespace switch from the engine's config, not from requests
                      structured_outputs_config={"backend": opts.structured_backend,
                                                 "disable_any_whitespace": True})
        if opts.max_model_len:
            kwargs["max_model_len"] = opts.max_model_len
        if impl == "transformers":
            kwargs["mm_processor_kwargs"] = vllm_processor_kwargs(self.processor)
        if self._hf_overrides:
            kwargs["hf_overrides"] = self._hf_overrides
        allowed = os.environ.get("VLLM_PLUGINS")
        if allowed is not None and "deepsynth" not in [p.strip() for p in allowed.split(",")]:
            # vLLM's own processes would build the model without the plugin: no patch readout, and
            # garbage answers rather than an error
            raise BundleError(f"VLLM_PLUGINS={allowed!r} leaves out this project's plugin 'deepsynth', which "
                              "vLLM's processes need to build these models as they were trained")
        if found.lora is not None:
            adapter_config = json.loads((Path(found.lora) / "adapter_config.json").read_text())
            kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(adapter_config, found.lora), max_loras=1)
        kwargs.update(opts.extra)
        logger.info("starting vLLM (%s backend) on %s%s", impl, found.path,
                    f" with LoRA {found.lora}" if found.lora else "")
        return LLM(**kwargs)

    def close(self) -> None:
        """Stop the driver and vLLM's processes; remove temporary model folders."""
        driver = getattr(self, "_driver", None)
        if driver is not None:
            driver.close()
            self._driver = None
        llm = getattr(self, "llm", None)
        if llm is not None:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None
        for tmp in getattr(self, "_temporary", []):
            shutil.rmtree(tmp, ignore_errors=True)
        self._temporary = []

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        """What requests are answered with: the model, its render config, decoding defaults, LoRA."""
        return {"model": self.name, "engine": self.engine_name, "dtype": self.dtype_name(),
                **self.documents.describe(),
                "generation": {k: v for k, v in dataclasses.asdict(self.generation).items() if k != "extra"},
                "lora": self.lora_path}

    def dtype_name(self) -> str:
        return self.options.dtype  # "auto" when vLLM chose (see VLLMOptions.dtype)

    def settings(self, settings: GenerationSettings | None = None, **overrides) -> GenerationSettings:
        """`settings` (or the engine's defaults) with `overrides` applied and validated."""
        return (settings or self.generation).replace(**overrides)

    def check_json_schema(self, schema: dict, settings: GenerationSettings | None = None,
                          field: str = "json_schema") -> dict:
        """The HF engine's checks (`deepsynth.models.structured.check_schema`), plus what vLLM's
        xgrammar backend cannot compile."""
        schema = check_schema(schema, (settings or self.generation).max_new_tokens, field)
        if self.options.structured_backend == "xgrammar":
            from vllm.v1.structured_output.backend_xgrammar import has_xgrammar_unsupported_json_features

            if has_xgrammar_unsupported_json_features(schema):
                raise SchemaError("vLLM's xgrammar backend cannot enforce this schema (a string with both a "
                                  "pattern and a length bound is the usual cause); drop one, or start the "
                                  "engine with structured_backend='guidance'", field)
        return schema

    # ------------------------------------------------------------------ requests

    def _params(self, settings: GenerationSettings, json_schema: dict | None, stream: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from deepsynth.vllm.guards import guard_args

        kwargs = dict(max_tokens=settings.max_new_tokens, repetition_penalty=settings.repetition_penalty,
                      skip_special_tokens=True, output_kind=RequestOutputKind.CUMULATIVE if stream
                      else RequestOutputKind.FINAL_ONLY)
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        else:
            kwargs.update(temperature=0.0)
        suppress = [self.image_token_id] if self.image_token_id is not None else []
        kwargs["extra_args"] = guard_args(settings.no_repeat_ngram_size, suppress, self.tokenizer.eos_token_id,
                                          None if json_schema is not None else self.loop_policy)
        if json_schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(json=json_schema)
        return SamplingParams(**kwargs)

    def _check_no_crops(self, doc: PreparedDocument, field: str) -> None:
        """Refuse pages the processor would cut into local crops: vLLM's Transformers backend splits
        image fields per image by one row count, which the crops (a varying number per page) break.
        Pages no larger than a tile get the global view alone, which vLLM serves in every crop mode."""
        if not self._images_kwargs.get("crop_to_patches"):
            return
        from deepsynth.render.modes import crop_grid

        ip = self.processor.image_processor
        settings = {key: self._images_kwargs.get(key, getattr(ip, key, None))
                    for key in ("tile_size", "min_patches", "max_patches")}
        for k, page in enumerate(doc.pages):
            columns, rows = crop_grid(page.width, page.height, settings["tile_size"], settings["min_patches"],
                                      settings["max_patches"])
            if columns * rows:
                mode = self.spec.crop_mode or "as saved"
                raise DocumentError(field, f"page {k + 1} ({page.width}x{page.height} px) would be cut into "
                                           f"{columns * rows} local crops (crop mode {mode}), "
                                           "which vLLM's Transformers backend does not serve; use the HF engine "
                                           "or crop mode 'none'")

    def _estimate_prompt_tokens(self, doc: PreparedDocument, prompt: dict) -> int:
        """Prompt length as the processor expands it (image tokens + text), before vLLM sees it."""
        visual = self.visual_token_count(doc) or 0
        if "prompt_token_ids" in prompt:
            image_id = getattr(self.processor, "image_token_id", None)
            return visual + sum(1 for t in prompt["prompt_token_ids"] if t != image_id)
        image_token = getattr(self.processor, "image_token", None)
        text = prompt["prompt"].replace(image_token, "") if image_token else prompt["prompt"]
        return visual + len(self.tokenizer(text)["input_ids"])

    def _submit(self, docs: Sequence[PreparedDocument], instructions: Sequence[str], settings: GenerationSettings,
                cancel: threading.Event | None, json_schema: dict | None, stream: bool = False) -> list[Request]:
        params = self._params(settings, json_schema, stream)
        requests = []
        for i, (doc, instruction) in enumerate(zip(docs, instructions)):
            self._check_no_crops(doc, field=f"documents[{i}]" if len(docs) > 1 else "document")
            prompt = vllm_prompt(self.spec, self.processor, doc.pages, instruction)
            self.documents.check_length(self._estimate_prompt_tokens(doc, prompt), settings,
                                        field=f"documents[{i}]" if len(docs) > 1 else "document")
            requests.append(Request(prompt=prompt, params=params.clone(), lora=self._lora_request, cancel=cancel))
        if self._driver is None:
            raise RuntimeError("the vLLM engine is closed")
        self._driver.submit(requests)
        return requests

    def _row(self, doc: PreparedDocument, out, cancelled: bool, json_schema: dict | None,
             answer_after: str = "") -> dict:
        """The Decoder's row fields from a vLLM output (`out` may be None: cancelled before a token)."""
        ids = list(out.outputs[0].token_ids) if out is not None else []
        eos = self.tokenizer.eos_token_id
        policy = self.loop_policy
        if json_schema is None and ids and ids[-1] == eos and find_loop(ids[:-1], policy) is not None:
            ids = ids[:-1]  # the EOS the loop stop forced: the row stopped in a loop, as LoopStop stops it
        kept = ids[:ids.index(eos)] if eos in ids else list(ids)
        if json_schema is None:
            row = _answer_row(list(ids), self.tokenizer, policy, cancelled, answer_after=answer_after)
        else:
            row = {"answer": self.tokenizer.decode(kept, skip_special_tokens=True).strip(), "new_tokens": len(kept),
                   "stopped": "eos" if eos in ids else "cancelled" if cancelled else "max_new_tokens"}
            if row["stopped"] != "eos":
                row["answer"] = close_text(json_schema, row["answer"])
        prompt_ids = list(out.prompt_token_ids) if out is not None else []
        row.update(token_ids=kept, prompt_tokens=len(prompt_ids),
                   visual_tokens=sum(1 for t in prompt_ids if t == self.image_token_id)
                   if self.image_token_id is not None else 0,
                   doc=doc, cached=doc.uses > 0)
        return row

    def generate_rows(self, documents: Sequence[Document | PreparedDocument], instructions: Sequence[str],
                      settings: GenerationSettings | None = None, cancel: threading.Event | None = None,
                      json_schema: dict | None = None) -> list[dict]:
        """Rows as `Decoder.run` gives them, plus `token_ids` (the answer's tokens before EOS)."""
        if len(documents) != len(instructions):
            raise ValueError(f"{len(documents)} documents but {len(instructions)} instructions")
        settings = settings or self.generation
        if json_schema is not None:
            self.check_json_schema(json_schema, settings)
        docs = [self.prepare(d, field=f"documents[{i}]") for i, d in enumerate(documents)]
        requests = self._submit(docs, [clean_text(i) for i in instructions], settings, cancel, json_schema)
        rows = []
        for doc, request in zip(docs, requests):
            out, cancelled = wait(request)
            rows.append(self._row(doc, out, cancelled, json_schema, settings.answer_after))
        for doc in docs:
            doc.uses += 1
        return rows

    def _rows(self, docs: list[PreparedDocument], instructions: list[str], settings: GenerationSettings,
              cancel: threading.Event | None = None, json_schema: dict | None = None) -> list[dict]:
        """A batch of `ask_batch`, handed to vLLM at once (it batches them with other callers' requests)."""
        return self.generate_rows(docs, instructions, settings, cancel, json_schema)

    def run_all(self, pages: Sequence[Sequence[Image.Image]], instructions: Sequence[str],
                settings: GenerationSettings | None = None, batch_size: int = 16) -> list[dict]:
        """`Decoder.run_all`'s rows, so that evaluation (`deepsynth.evaluation.run`) scores the answers
        this engine serves. Every pair goes to vLLM at once (it schedules them itself), so
        `batch_size`, the HF decoder's generate-call size, does not apply."""
        return self.generate_rows([list(p) for p in pages], list(instructions), settings)

    def stream(self, document: Document | PreparedDocument, instruction: str,
               settings: GenerationSettings | None = None, cancel: threading.Event | None = None,
               json_schema: dict | None = None, **overrides) -> Iterator[str | Answer]:
        """Yield the answer's text as vLLM generates it, then the final (authoritative) `Answer`."""
        settings = self.settings(settings, **overrides)
        if json_schema is not None:
            self.check_json_schema(json_schema, settings)
        start = time.perf_counter()
        cancel = cancel or threading.Event()
        doc = self.prepare(document)
        (request,) = self._submit([doc], [clean_text(instruction)], settings, cancel, json_schema, stream=True)
        sent, last, cancelled = "", None, False
        try:
            while True:
                kind, value = request.outputs.get()
                if kind == "error":
                    raise value
                if kind == "cancelled":
                    cancelled, last = True, value if value is not None else last
                    break
                last = value
                if value.finished:
                    raise_if_failed(value)
                text = value.outputs[0].text
                if len(text) > len(sent) and text.startswith(sent):
                    yield text[len(sent):]
                    sent = text
                if value.finished:
                    break
        except GeneratorExit:  # the consumer stopped early: stop generating too
            cancel.set()
            raise
        row = self._row(doc, last, cancelled, json_schema, settings.answer_after)
        doc.uses += 1
        yield Answer.from_row(row, (time.perf_counter() - start) * 1000)

