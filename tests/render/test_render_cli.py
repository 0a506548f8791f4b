"""`deepsynth render` command: files, stdin, manifest, parallel workers, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from deepsynth.render import RenderConfig, render_text
from deepsynth.render.cli import build_config, parse_page_size, register, render_command


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:  # keeps "render" a sub-command, as in the real app
        """test app"""

    register(app)
    return app


@pytest.fixture()
def docs(tmp_path: Path) -> dict[str, Path]:
    long = tmp_path / "long.txt"
    long.write_text(" ".join(f"w{i:04d}" for i in range(1500)), encoding="utf-8")
    md = tmp_path / "notes.md"
    md.write_text("# Title\n- **item** one\n```\ncode\n```\n", encoding="utf-8")
    return {"long": long, "md": md}


def invoke(app, args, input=None):
    return CliRunner().invoke(app, ["render", *args], input=input)


def test_cli_writes_pngs_and_manifest(app, docs, tmp_path):
    out = tmp_path / "out"
    res = invoke(app, [str(docs["long"]), str(docs["md"]), "-", "-o", str(out), "--preset", "small",
                       "--workers", "1"], input="hello from stdin")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["errors"] == []
    assert manifest["config"]["page_width"] == 512
    names = [d["name"] for d in manifest["documents"]]
    assert names == ["long", "notes", "stdin"]
    long_doc, md_doc, stdin_doc = manifest["documents"]
    assert len(long_doc["pages"]) > 1
    assert long_doc["stats"]["pages"] == len(long_doc["pages"])
    assert long_doc["stats"]["words"] == 1500
    words = " ".join(p["text"] for p in long_doc["pages"]).split()
    assert words == [f"w{i:04d}" for i in range(1500)]
    for doc in manifest["documents"]:
        for i, page in enumerate(doc["pages"]):
            assert page["file"] == f"{doc['name']}/page-{i + 1:04d}.png"
            with Image.open(out / page["file"]) as img:
                assert img.size == (512, 512)
    assert md_doc["markdown"] is True and md_doc["pages"][0]["text"] == "Title\n\u2022 item one\ncode"
    assert stdin_doc["source"] == "-" and stdin_doc["pages"][0]["text"] == "hello from stdin"
    # the PNG is exactly what the library renders
    expected = render_text("hello from stdin", RenderConfig.from_preset("small"))[0].image
    with Image.open(out / "stdin/page-0001.png") as img:
        assert img.convert("RGB").tobytes() == expected.tobytes()


def test_cli_parallel_workers_match_serial(docs, tmp_path):
    inputs = [str(docs["long"]), str(docs["md"])]
    serial = render_command(inputs, tmp_path / "a", preset="small", workers=1, progress=False)
    parallel = render_command(inputs, tmp_path / "b", preset="small", workers=2, progress=False)
    assert serial["documents"] == parallel["documents"]
    for doc in serial["documents"]:
        for page in doc["pages"]:
            assert (tmp_path / "a" / page["file"]).read_bytes() == (tmp_path / "b" / page["file"]).read_bytes()


def test_cli_options_page_size_font_size(app, docs, tmp_path):
    out = tmp_path / "o"
    res = invoke(app, [str(docs["md"]), "-o", str(out), "--page-size", "300x200", "--font-size", "12"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["config"]["page_width"], manifest["config"]["page_height"]) == (300, 200)
    assert manifest["config"]["font_size"] == 12
    with Image.open(out / "notes" / "page-0001.png") as img:
        assert img.size == (300, 200)


def test_duplicate_stems_get_unique_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "doc.txt").write_text(f"text {d}")
    m = render_command([str(tmp_path / "a/doc.txt"), str(tmp_path / "b/doc.txt")], tmp_path / "out",
                       workers=1, progress=False)
    assert [d["name"] for d in m["documents"]] == ["doc", "doc-2"]
    assert (tmp_path / "out/doc-2/page-0001.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.txt"], "does not exist"),
        (["{long}", "--page-size", "10"], "not WxH"),
        (["{long}", "--page-size", "10x10"], "page_width=10"),
        (["{long}", "--preset", "nope"], "unknown preset"),
        (["{long}", "--font-size", "2"], "font_size=2"),
        (["{long}", "--workers", "-1"], "--workers"),
    ],
)
def test_cli_bad_input_exits_2_with_message(app, docs, tmp_path, args, message):
    args = [a.format(long=docs["long"]) for a in args]
    res = invoke(app, [*args, "-o", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert message in " ".join(res.output.replace("│", " ").split())
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_render_failure_exits_1_and_keeps_other_documents(app, docs, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = tmp_path / "out"
    res = invoke(app, [str(docs["md"]), str(empty), "-o", str(out)])
    assert res.exit_code == 1
    assert "text is empty" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [d["name"] for d in manifest["documents"]] == ["notes"]
    assert manifest["errors"][0]["source"] == str(empty)


def test_helpers():
    assert parse_page_size("640x480") == (640, 480)
    assert parse_page_size(" 64X64 ") == (64, 64)
    with pytest.raises(typer.BadParameter):
        parse_page_size("640*480")
    assert build_config("tiny").font_size == 32
    assert build_config(None, font_size=30).font_size == 30


@pytest.mark.parametrize("filename", ["...txt", ".txt", "a:b*c.txt", ".hidden.txt", "-"])
def test_output_names_never_leave_the_output_folder(app, tmp_path, filename):
    """'...txt' has the stem '..': its pages used to land in OUTDIR's parent, deleting page files there."""
    work = tmp_path / "work"
    work.mkdir()
    if filename != "-":
        (work / filename).write_text("escape attempt", encoding="utf-8")
    victim = tmp_path / "page-0042.png"  # someone else's file beside OUTDIR
    victim.write_bytes(b"not mine")
    out = tmp_path / "out"
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(out)}
    res = invoke(app, [filename if filename == "-" else str(work / filename), "-o", str(out)], input="from stdin")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    (doc,) = manifest["documents"]
    name = doc["name"]
    assert name and "/" not in name and not name.startswith(".")
    assert (out / name / "page-0001.png").is_file()
    assert victim.read_bytes() == b"not mine"
    assert {p for p in tmp_path.rglob("*") if not p.is_relative_to(out)} == before  # nothing written outside


@pytest.mark.parametrize("stem, expected", [("..", "document"), ("", "document"), ("a/../b", "a_.._b"),
                                            ("../../etc", "_.._etc"), ("x\\y", "x_y"), ("日本語", "日本語"),
                                            ("report.v2", "report.v2"), ("a" * 300, "a" * 100)])
def test_safe_name(stem, expected):
    from deepsynth.render.cli import safe_name

    assert safe_name(stem) == expected


def test_names_are_unique_case_insensitively_and_symlinks_out_are_refused(tmp_path):
    from deepsynth.render.cli import _unique_names

    assert _unique_names(["a/Doc.txt", "b/doc.txt", "c/DOC.md"]) == ["Doc", "doc-2", "DOC-3"]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "page-0001.png").write_bytes(b"keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "doc").symlink_to(outside, target_is_directory=True)
    src = tmp_path / "doc.txt"
    src.write_text("hello", encoding="utf-8")
    m = render_command([str(src)], out, workers=1, progress=False)
    assert m["documents"] == [] and "not a plain folder inside" in m["errors"][0]["error"]
    assert (outside / "page-0001.png").read_bytes() == b"keep"
