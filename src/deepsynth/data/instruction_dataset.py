"""`InstructionDataset`: a torch Dataset of rendered pages + instruction + answer."""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import Dataset

from deepsynth.data.schema import InstructionExample
from deepsynth.render import RenderConfig, render_text


class InstructionDataset(Dataset):
    """Examples rendered to pages on the fly (rendering is cheap next to a training step).

    examples:            the records; each is validated once here.
    render_config:       how documents become pages; it must match what the model reads
                         (default `RenderConfig()`, 1024 px pages).
    default_instruction: used where an example's instruction is empty.
    """

    def __init__(
        self,
        examples: Sequence[InstructionExample],
        render_config: RenderConfig | None = None,
        default_instruction: str = "",
    ) -> None:
        for ex in examples:
            ex.validate()
        self.examples = list(examples)
        self.render_config = render_config or RenderConfig()
        self.default_instruction = default_instruction

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        return {
            "id": ex.id,
            "pages": [page.image for page in render_text(ex.text, self.render_config)],
            "instruction": ex.instruction or self.default_instruction,
            "answer": ex.answer,
        }
