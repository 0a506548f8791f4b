"""The learning claim, on CPU in a few minutes: the shipped form reader (`form-reader`), fine-tuned on a question
phrasing it never saw in pre-training (it answers none of them before), learns to answer
questions about new pages in that phrasing, and without the instruction it falls to chance."""

from deepsynth.data.synthetic import SyntheticConfig, chance_em, generate
from deepsynth.evaluation.run import evaluate_examples, evaluate_with_ablation
from deepsynth.render import RenderConfig
from deepsynth.training.config import TrainerConfig
from deepsynth.training.trainer import Trainer

# Pre-training asked "{key}?"; this phrasing is new to the model.
SYN = SyntheticConfig(layout="form", question_templates=("value of {key} please",))


def test_reader_learns_to_follow_a_new_instruction(tmp_path):
    train = generate(SYN, 4000, "train", kinds=("question",))
    heldout = generate(SYN, 100, "heldout_docs")
    assert not {ex.text for ex in heldout} & {ex.text for ex in train}
    pages = RenderConfig.from_preset("tiny")
    cfg = TrainerConfig(model_name="form-reader", output_dir=str(tmp_path / "run"), batch_size=16, max_steps=STEPS,
                        learning_rate=4e-4, lr_scheduler="cosine", warmup_steps=10, log_interval=10, seed=0)
    trainer = Trainer(cfg)
    before = evaluate_examples(trainer.decoder(), heldout, pages)["scores"]["em"]
    metrics, _ = trainer.train(train)
    report = evaluate_with_ablation(trainer.decoder(), heldout, pages, chance_em(SYN))
    em, em_blind = report["scores"]["em"], report["scores_no_instruction"]["em"]
    assert metrics["loss_last"] < LOSS_DROP * metrics["loss_first"], metrics
    assert em >= MIN_EM and em >= before + MIN_GAIN, (before, report["scores"])
    assert em_blind <= chance_em(SYN) + 0.10, report["scores_no_instruction"]


# This checks that learning happens, not how far it goes (the demo shows how far). The trajectory
# depends on the CPU's float kernels: at 400 steps one machine reached EM 0.31 and another 0.19, just
# under MIN_EM, so the run is 700 steps long, which clears the bar on both.
STEPS = 700
LOSS_DROP = 0.2
MIN_EM = 0.2
MIN_GAIN = 0.2
