"""Every command of the README's quick start runs as written, in order, on a small shapes world and a few
training steps: the only changes are the sizes below, appended to the commands they concern."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

from vlp.cli import main
from vlp.config import read_mapping
from vlp.registry import FAMILIES, parse_model_config

README = Path(__file__).parent.parent / "README.md"
# Appended for speed: a small world, two training steps, small fine-tuning runs; nothing else changes.
SMALLER = {
    ("data", "shapes"): ["--train", "400", "--test", "40", "--web", "60", "--classify", "60", "--shards", "2"],
    ("train",): [f"--set={s}" for s in ("train.steps=2", "train.save_every=2", "train.log_every=1",
                                        "train.warmup_steps=0", "train.batch_size=8", "data.num_workers=0",
                                        "train.progress=false")],
    ("capfilt",): [f"--set={s}" for s in ("steps=2", "warmup_steps=0", "batch_size=8", "save_every=2",
                                          "num_workers=0", "max_new_tokens=8")],
}


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


def readme_commands() -> list[list[str]]:
    """The `.venv/bin/vlp` commands of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == ".venv/bin/vlp":
                commands.append(words[1:])
    return commands


def test_the_readme_stays_short_and_its_quick_start_trains_every_family():
    assert len(README.read_text().splitlines()) <= 250
    configs = [README.parent / c[c.index("--config") + 1] for c in readme_commands() if c[0] == "train"]
    assert {parse_model_config(read_mapping(config)["model"])[0].name for config in configs} == set(FAMILIES)


def test_every_readme_command_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("configs").symlink_to(README.parent / "configs")
    for command in readme_commands():
        extra = next((v for k, v in SMALLER.items() if tuple(command[: len(k)]) == k), [])
        assert main([*command, *extra]) == 0, (command, capsys.readouterr().err[-2000:])
    for block in readme_blocks("python"):
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - the README's Python, run as a reader would


def test_the_results_pages_tables_are_those_of_the_results_files():
    script = README.parent / "benchmarks" / "results_docs.py"
    check = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
