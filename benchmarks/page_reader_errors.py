"""Where a page reader misreads: teacher-forced character errors on held-out pages, by place.

For held-out transcription pages (1 to 14 lines of words, prose and mixed text, drawn where the
renderer puts them), the reader is given the gold text so far and must name the next character;
each answer character that is drawn on the page is counted by where it lies on the image-token
grid (`CharSlots.places`: which of a token's two text lines and four character columns), by line
of the page, by kind of character and by where it falls in the answer. Each wrong character is
classed by where the reader's guess is drawn: in another slot of the same image token (it looked
at the right token and took the wrong character from it), in a neighbouring token, elsewhere on
the page, or nowhere on it (it came from the decoder's own prior). Where the reader's character-slot
probe is saved beside it, every character is also read by the probe from the image tokens the
decoder sees: decoder right or wrong against probe right or wrong tells whether the page's image
tokens hold the character (the probe reads it) and the decoder fails to take it out, or not.

    python benchmarks/page_reader_errors.py --model tiny-reader --n 100 --out benchmarks/page_reader_errors_report.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from deepsynth.models import load_model
from deepsynth.models.collate import IGNORE_INDEX, Collator
from deepsynth.models.registry import resolve
from deepsynth.render import RenderConfig
from deepsynth.training.page_reader import (PROBE_FILE, CharSlotProbe, CharSlots, heldout_transcriptions,
                                            reader_preset)


def char_class(ch: str) -> str:
    return "letter" if ch.isalpha() else "digit" if ch.isdigit() else "punctuation"


@torch.no_grad()
def errors(model, processor, examples: list[dict], probe_file: Path | None, batch_size: int = 8) -> dict:
    render = RenderConfig.from_preset(examples[0]["preset"])
    slots = CharSlots.for_reader(processor, render)
    probe, kept, hook = None, {}, None
    if probe_file is not None and probe_file.is_file():
        probe = CharSlotProbe(model.config.text_config.hidden_size, slots, len(processor.tokenizer))
        probe.load_state_dict(load_file(str(probe_file)))
        hook = model.get_submodule("model.multi_modal_projector").register_forward_hook(
            lambda module, args, output: kept.update(embeddings=output))
    agreement: dict[str, int] = defaultdict(int)
    collator = Collator(processor, max_length=4096)
    tok = processor.tokenizer
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    wrong_where: dict[str, int] = defaultdict(int)
    samples: list[dict] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = collator([{k: e[k] for k in ("pages", "instruction", "answer")} for e in chunk])
        logits = model(**batch).logits[:, :-1]
        if probe is not None:  # (pages, tokens, slots): one page per example
            read = probe(kept["embeddings"].reshape(len(chunk), slots.grid ** 2, -1)).argmax(-1)
        labels = batch["labels"][:, 1:]
        for row, example in enumerate(chunk):
            answer_at = (labels[row] != IGNORE_INDEX).nonzero().flatten()
            guesses = logits[row, answer_at].argmax(-1).tolist()
            gold_ids = labels[row, answer_at].tolist()
            text = "\n".join(line.text for line, _ in example["placed"])
            if text != example["answer"] or len(gold_ids) != len(text) + 1:  # + EOS
                raise ValueError("a transcription answer is not one token per drawn character")
            grid = slots.labels(example["placed"], render)  # (tokens, slots) character ids drawn
            places = slots.places(example["placed"], render)
            line = 0
            for k, (ch, place) in enumerate(zip(text, places)):
                line += ch == "\n"
                if place is None:
                    continue
                token, slot = place
                right = guesses[k] == gold_ids[k]
                keys = {"slot_line": str(slot // slots.cols), "slot_column": str(slot % slots.cols),
                        "page_line": f"{line + 1:02d}", "character": char_class(ch),
                        "answer_part": "first half" if k < len(text) / 2 else "second half"}
                for name, value in keys.items():
                    counts[name][value][0] += right
                    counts[name][value][1] += 1
                if probe is not None:
                    probe_right = int(read[row, token, slot]) == int(grid[token, slot])
                    agreement[f"decoder {'right' if right else 'wrong'}, probe {'right' if probe_right else 'wrong'}"] += 1
                if right:
                    continue
                guess = guesses[k]
                near = [t for t in (token - 1, token + 1, token - slots.grid, token + slots.grid)
                        if 0 <= t < slots.grid ** 2]
                if guess in grid[token].tolist():
                    wrong_where["same token, other slot"] += 1
                elif any(guess in grid[t].tolist() for t in near):
                    wrong_where["neighbouring token"] += 1
                elif (grid == guess).any():
                    wrong_where["elsewhere on the page"] += 1
                else:
                    wrong_where["not on the page"] += 1
                if len(samples) < 30:
                    samples.append({"gold": ch, "guess": tok.convert_ids_to_tokens(guess),
                                    "context": text[max(0, k - 12):k + 1]})
    if hook is not None:  # the model may be scored again after this
        hook.remove()
    accuracy = {name: {value: {"accuracy": round(r / n, 4), "chars": n} for value, (r, n) in sorted(by.items())}
                for name, by in counts.items()}
    total = sum(n for _, n in counts["character"].values())
    right = sum(r for r, _ in counts["character"].values())
    return {"teacher_forced_accuracy": round(right / total, 4), "chars": total, "by": accuracy,
            "wrong_guess_drawn": dict(wrong_where), "decoder_and_probe": dict(sorted(agreement.items())),
            "wrong_samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="page reader folder or name (repeatable)")
    parser.add_argument("--n", type=int, default=100, help="held-out pages")
    parser.add_argument("--seed", type=int, default=77)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/page_reader_errors_report.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"settings": vars(args), "models": {}}
    for name in args.model:
        model, processor = load_model(name)
        model.eval()
        folder = Path(resolve(name))
        examples = heldout_transcriptions(args.n, args.seed, preset=reader_preset(str(folder)))
        report["models"][name] = errors(model, processor, examples, folder / PROBE_FILE)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
