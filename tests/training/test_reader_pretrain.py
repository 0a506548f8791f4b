import json
from pathlib import Path

import deepsynth.models
from deepsynth.models import load_model
from deepsynth.training.reader_pretrain import PretrainConfig, STAGES, pretrain, render_fingerprint


def test_short_pretrain_writes_a_loadable_reader_with_its_history(tmp_path):
    out = tmp_path / "reader"
    meta = pretrain(PretrainConfig(out=str(out), minutes=0.05, batch_size=2, eval_examples=4, start_stage=len(STAGES) - 1))
    assert meta["step"] >= 1
    assert set(meta["eval"]) == {f"{kind}_{m}" for kind in ("read", "question", "question_seen_values")
                                 for m in ("em", "char_acc")}
    saved = json.loads((out / "reader_pretrain.json").read_text())
    assert saved["render_fingerprint"] == render_fingerprint() and saved["phases"][-1]["step"] == meta["step"]
    history = [json.loads(line) for line in (out / "reader_pretrain.phase1.log.jsonl").read_text().splitlines()]
    assert history[-1]["final"]["step"] == meta["step"]
    model, processor = load_model(str(out))
    assert model.config.vision_readout == "patches"
    assert not (tmp_path / "reader.tmp").exists()

    # A second phase continues from the first; both phases' metadata and logs ship together.
    again = tmp_path / "reader2"
    meta2 = pretrain(PretrainConfig(out=str(again), minutes=0.03, batch_size=2, eval_examples=4, init_from=str(out),
                                    start_stage=len(STAGES) - 1, layout="form", question_share=1.0))
    saved = json.loads((again / "reader_pretrain.json").read_text())
    assert [p["step"] for p in saved["phases"]] == [meta["step"], meta2["step"]]
    assert saved["phases"][1]["config"]["layout"] == "form"
    assert (again / "reader_pretrain.phase1.log.jsonl").read_text() == (out / "reader_pretrain.phase1.log.jsonl").read_text()
    assert (again / "reader_pretrain.phase2.log.jsonl").exists()


def test_shipped_reader_matches_the_renderer():
    # The reader only reads pages drawn exactly as when it was trained.
    shipped = Path(deepsynth.models.__file__).parent / "checkpoints" / "tiny-reader" / "reader_pretrain.json"
    assert json.loads(shipped.read_text())["render_fingerprint"] == render_fingerprint()



def test_jitter_moves_training_pages():
    import random

    from deepsynth.data.synthetic import SyntheticConfig, split_values
    from deepsynth.training.reader_pretrain import Stage, make_example

    syn = SyntheticConfig(layout="form")
    values, _ = split_values(syn)
    stage = STAGES[-1]
    plain = make_example(random.Random(1), stage, syn, values)
    moved = make_example(random.Random(1), stage, syn, values, jitter=8)
    assert (plain["instruction"], plain["answer"]) == (moved["instruction"], moved["answer"])
    assert plain["pages"][0].size == moved["pages"][0].size
    assert plain["pages"][0].tobytes() != moved["pages"][0].tobytes()
