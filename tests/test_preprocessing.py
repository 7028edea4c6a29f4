"""The torch-free preprocessor (``FolderPreprocessor``) gives the recipe's outputs exactly, and its factory builds it
in a process that never imports torch or transformers (what makes Ray Data's actors start fast)."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import BlipForConditionalGeneration

from medvl.data.images import encode_png
from medvl.data.preprocessing import FolderPreprocessor, UnsupportedFolder
from medvl.models.blip_caption import save_tiny_blip
from medvl.models.registry import build_recipe
from medvl.spec import parse_spec
from PIL import Image

SIZE = 32
TEXTS = ["left pleural effusion", "heart size is normal", "no pneumothorax", "small nodule in the right upper zone"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return save_tiny_blip(BlipForConditionalGeneration, tmp_path_factory.mktemp("tiny"), TEXTS * 5, SIZE)


def caption_recipe(folder: str, max_text_length: int = 8):
    return build_recipe(parse_spec({
        "name": "t", "output_dir": "/tmp/unused", "stages": ["train"],
        "data": {"image_size": SIZE, "max_text_length": max_text_length},
        "model": {"recipe": "blip_caption", "name_or_path": folder},
    }))


def rows() -> dict[str, np.ndarray]:
    """Images of other sizes than the model's (resized), one that does not decode (skipped), a text longer than
    ``max_text_length`` (truncated) and an empty one."""
    rng = np.random.default_rng(0)
    images = [encode_png(Image.fromarray(rng.integers(0, 256, (side, side + 3, 3), dtype=np.uint8)))
              for side in (48, 20, 32, 57)]
    images.insert(2, b"not an image")
    texts = ["the heart size is normal and there is a small left pleural effusion", *TEXTS[:3], ""]
    n = len(images)
    return {"id": np.array([f"r{i}" for i in range(n)], dtype=object), "image": np.array(images, dtype=object),
            "text": np.array(texts, dtype=object), **{k: np.array([""] * n, dtype=object)
                                                      for k in ("answer", "answer_type", "question", "meta")}}


def test_the_torch_free_preprocessor_gives_the_recipes_outputs_exactly(tiny_folder):
    recipe = caption_recipe(tiny_folder)
    expected = recipe.preprocessor(tiny_folder)(rows())
    got = recipe.preprocessor_factory(tiny_folder)()(rows())
    assert isinstance(recipe.preprocessor_factory(tiny_folder)(), FolderPreprocessor)
    assert sorted(got) == sorted(expected)
    assert len(got["id"]) == 4  # the undecodable image was dropped by both
    for name, values in expected.items():
        assert got[name].dtype == values.dtype, name
        np.testing.assert_array_equal(got[name], values, err_msg=name)
    assert got["attention_mask"][0].all()  # the long text filled the row: truncated, [end] kept last
    assert got["input_ids"][0, -1] == got["input_ids"][1, got["attention_mask"][1].sum() - 1]


def test_its_factory_builds_it_without_importing_torch_or_transformers(tiny_folder, tmp_path):
    factory = tmp_path / "factory.pkl"
    factory.write_bytes(pickle.dumps(caption_recipe(tiny_folder).preprocessor_factory(tiny_folder)))
    script = (
        "import pickle, sys\n"
        f"preprocess = pickle.loads(open({str(factory)!r}, 'rb').read())()\n"
        "out = preprocess(pickle.loads(sys.stdin.buffer.read()))\n"
        "print(out['pixel_values'].shape, sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(rows()), capture_output=True,
                          cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split() == ["(4,", "3,", f"{SIZE},", f"{SIZE})", "[]"]


def test_a_folder_it_cannot_replay_keeps_the_recipes_preprocessor(tiny_folder, tmp_path):
    import shutil

    folder = tmp_path / "cropping"
    shutil.copytree(tiny_folder, folder)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(settings | {"do_center_crop": True}))
    with pytest.raises(UnsupportedFolder):
        FolderPreprocessor(str(folder), SIZE, 8, 2, 3, 0)
    recipe = caption_recipe(str(folder))
    assert type(recipe.preprocessor_factory(str(folder))()) is type(recipe.preprocessor(str(folder)))
