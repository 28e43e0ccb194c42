from pathlib import Path

from vlp.demo import run_demo


def test_demo_writes_a_report_with_tables_and_plots(shapes_world, tmp_path):
    overrides = ["train.steps=3", "train.batch_size=32", "train.progress=false", "data.num_workers=0",
                 "train.warmup_steps=1"]
    report = run_demo(out=tmp_path / "demo", data=shapes_world, configs=Path("configs"),
                      overrides=overrides)
    text = report.read_text()
    for heading in ("Zero-shot classification: shape", "held-out colour-shape pairs", "Retrieval, test split"):
        assert heading in text
    assert "| clip |" in text and "| siglip |" in text
    for image in ("curves.png", "recall_at_k.png", "retrieval_grid.png", "page.png"):
        assert (tmp_path / "demo" / image).stat().st_size > 1000
    assert "Searching the test images" in text and "![the page](page.png)" in text
    assert (tmp_path / "demo" / "index" / "manifest.json").is_file()
    again = run_demo(out=tmp_path / "demo", data=shapes_world, configs=Path("configs"),
                     overrides=overrides)  # a re-run reuses the finished runs
    assert again == report
