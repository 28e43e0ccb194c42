"""The layout the code keeps: the generic layers name no family, loading and predicting import no training
code, and no source file outgrows a read."""

import re
import subprocess
import sys
from pathlib import Path

import vlp
from vlp.assets import IMAGE, TEXT, Assets
from vlp.assets.image import ImageConfig
from vlp.assets.tokenizer import TokenizerConfig, train_tokenizer
from vlp.checkpoint import save_checkpoint
from vlp.registry import FAMILIES, create_model, get_family

SRC = Path(vlp.__file__).parent
# Family keys, the papers' names for them, and the query transformer's.
NAMES = sorted({*FAMILIES, "siglip", "owlv2", "owl-vit", "blip-2", "coca", "qformer", "q-former"}, key=len, reverse=True)
FAMILY_NAME = re.compile(r"\b(" + "|".join(re.escape(name) for name in NAMES) + r")\b", re.IGNORECASE)
GENERIC = ["cli.py", "checkpoint.py", "train", "serve", "evals", "tasks"]


def _generic_files() -> list[Path]:
    files = []
    for name in GENERIC:
        path = SRC / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else []
    return files


def test_no_generic_module_names_a_family_or_the_query_transformer():
    """Families are declared in the registry and trained by their recipes; the command line, the trainer, the
    checkpoint, the service, the evaluations and the tasks know them only through what they declare."""
    found = [f"{path.relative_to(SRC)}:{number}: {line.strip()}"
             for path in _generic_files() for number, line in enumerate(path.read_text().splitlines(), start=1)
             if FAMILY_NAME.search(line)]
    assert not found, "\n".join(found)


def test_the_name_check_sees_the_names_it_looks_for():
    assert FAMILY_NAME.search('if family == "blip2_qformer":') and FAMILY_NAME.search("the Q-Former's tokenizer")
    assert FAMILY_NAME.search("as CLIP does") and not FAMILY_NAME.search("CLIP_benchmark's metric names")
    assert not FAMILY_NAME.search("train.grad_clip") and not FAMILY_NAME.search("open_clip's folder")


def test_no_source_file_is_over_450_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_loading_a_checkpoint_and_predicting_import_no_training_or_process_group_code(tmp_path):
    family = get_family("clip")
    model = create_model("clip-tiny")
    tokenizer = train_tokenizer(["a red circle", "two blue squares"] * 20, TokenizerConfig(vocab_size=300))
    folder = save_checkpoint(tmp_path / "clip", family=family, model_config=model.cfg, model=model,
                             assets=Assets({TEXT: tokenizer}, {IMAGE: ImageConfig(size=48)}))
    code = ("import sys, vlp; from vlp.tasks import predict_functions; "
            f"functions = predict_functions(vlp.load({str(folder)!r}), device='cpu'); "
            "print(tuple(functions.embed_texts(['a red circle']).shape)); print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "(1, 128)"
    training = [m for m in out[1].split() if m.startswith(("vlp.objectives", "vlp.train", "vlp.distributed"))]
    assert not training, training
