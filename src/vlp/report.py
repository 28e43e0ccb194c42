"""Reports: the demo's Markdown page with metric tables and plots (matplotlib, Agg backend), and what every
recorded figure carries: the machine it was measured on and its spread over seeds."""

from __future__ import annotations

import os
import platform
import statistics
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from PIL import Image

from vlp.precision import has_native_bf16
from vlp.train.run_folder import METRICS_FILE
from vlp.train.run_folder import read_metrics as read_metrics_file


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's log records that have a loss (a log step whose steps were all skipped has none)."""
    return [r for r in read_metrics_file(run_dir / METRICS_FILE) if "loss" in r]


def plot_curves(runs: dict[str, Path], out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, run_dir in runs.items():
        records = read_metrics(run_dir)
        steps = [r["step"] for r in records]
        axes[0].plot(steps, [r["loss"] for r in records], label=name)
        axes[1].plot(steps, [r.get("logit_scale", float("nan")) for r in records], label=name)
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title="learned logit scale", xlabel="step")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_recall(results: dict[str, dict[str, dict]], key: str, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    titles = {"image_retrieval": "image retrieval (text → image)", "text_retrieval": "text retrieval (image → text)"}
    for ax, direction in zip(axes, titles):
        for name, tasks in results.items():
            metrics = tasks[key]["metrics"]
            ks = sorted(int(m.split("@")[1]) for m in metrics if m.startswith(direction))
            ax.plot(ks, [metrics[f"{direction}_recall@{k}"] for k in ks], marker="o", label=name)
        ax.set(title=titles[direction], xlabel="k", ylabel="recall@k", ylim=(0, 1.02))
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_retrieval_grid(images: list[Path], top_captions: list[list[str]], truths: list[list[str]],
                        out: Path) -> Path:
    """Test images with their top retrieved captions (a tick marks a caption written for that image)."""
    cols = 4
    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows))
    for ax, path, captions, truth in zip(axes.flat, images, top_captions, truths):
        ax.imshow(Image.open(path).convert("RGB"))
        ax.set_xticks([])
        ax.set_yticks([])
        lines = [("✓ " if c in truth else "✗ ") + textwrap.shorten(c, 48) for c in captions]
        ax.set_xlabel("\n".join(lines), fontsize=7, loc="left")
    for ax in list(axes.flat)[len(images):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def metrics_table(results: dict[str, dict[str, dict]], key: str, names: list[str]) -> str:
    header = "| model | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (len(names) + 1)]
    for model, tasks in results.items():
        metrics = tasks[key]["metrics"]
        lines.append(f"| {model} | " + " | ".join("n/a" if metrics[n] is None else f"{metrics[n]:.3f}" for n in names)
                     + " |")
    return "\n".join(lines)


def machine() -> dict[str, object]:
    """The machine a figure is measured on: CPU, cores, threads, memory, versions, and native bf16."""
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        # without it a CPU's bf16 columns time emulation: not the speed a user with bf16 hardware gets
        "native_bf16": has_native_bf16("cpu"),
    }


def mean_range(values: list[float]) -> str:
    """A figure over seeds as the results pages state it: the mean, then the range when there is more than one."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def page_screenshot(url: str, query: str, path: Path, results: int = 12) -> bool:
    """The service's page at `url` answering a text search, as headless Chromium shows it, saved to `path`;
    False (and nothing written) where Debian's chromium and chromedriver, or selenium, are not installed."""
    import shutil

    try:
        from selenium import webdriver
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        return False
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return False
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: "models:" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "k").clear()
        driver.find_element(By.ID, "k").send_keys(str(results))
        driver.find_element(By.ID, "query").send_keys(query)
        driver.find_element(By.ID, "search").click()
        WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == results)
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
    finally:
        driver.quit()
    return True

