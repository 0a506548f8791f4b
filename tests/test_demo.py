"""The demo end to end at toy size: every report field, the predictions and the curve are written."""

import json

from deepsynth.demo import DemoConfig, format_table, run_demo


def test_demo_writes_its_report(tmp_path):
    report = run_demo(DemoConfig(out=str(tmp_path), minutes=0.05, train_questions=64, n_eval=8, batch_size=4))
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(json.dumps(report))
    for key in ("em", "f1", "em_no_instruction", "em_before_finetune", "em_unseen_values"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["chance_em"] == 0.25 and report["layout"] == "form" and report["n_eval"] == 8
    assert report["train_steps"] >= 1 and report["total_seconds"] >= report["train_seconds"]
    for name in ("eval.json", "eval-unseen-values.json", "example-page.png", "train/curves.png"):
        assert (tmp_path / name).is_file(), name
    assert "EM, values never seen" in format_table(report)
