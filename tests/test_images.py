"""The user's own images: ``mmprompt predict --images`` and ``mmprompt.load`` give the module's own
probabilities, name bad files, and the README's Python example runs as written."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmprompt
from mmprompt.data.transforms import build_transform
from mmprompt.model.module import PromptCLIPModule
from mmprompt.run.cli import cli_main, main

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]


@pytest.fixture(scope="module")
def checkpoint(data_root, tmp_path_factory) -> Path:
    """A base-to-novel BiasTuning run on the synthetic shapes (biases drawn large, so they matter)."""
    out = tmp_path_factory.mktemp("runs")
    cli_main(["fit", "--config", "demo", "--config", "tiny", "--model.adapter", "mmprompt.adapters.BiasTuning",
              "--model.adapter.init_args.init_std", "0.5", "--data.dataset", "synthetic", "--data.root", str(data_root),
              "--out_dir", str(out), "--version", "v", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
              "--trainer.limit_test_batches", "1", "--compare_zero_shot", "false", *QUIET])
    return out / "demo" / "v" / "checkpoints" / "last.ckpt"


def images_of(data_root: Path) -> Path:
    return data_root / "synthetic" / "images"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def reference_probabilities(checkpoint: Path, paths: list[Path], classnames: tuple[str, ...]) -> torch.Tensor:
    """Softmax of the module's own forward on the images, transformed as the test split is."""
    module = PromptCLIPModule.load_from_checkpoint(checkpoint).eval()
    transform = build_transform(False, module.spec.image_size)
    pixels = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
    classes = module.class_sets("test")
    assert classes[0].classnames + classes[1].classnames == classnames  # base then new: every class once
    from mmprompt.classes import ClassSet

    with torch.no_grad():
        return module(pixels, ClassSet("images", classnames, classes[0].template)).softmax(dim=-1)


def test_predict_images_writes_the_modules_top_k_for_files_folders_and_globs(checkpoint, data_root, tmp_path):
    images = images_of(data_root)
    given = [str(images / "star" / "star_0003.png"), str(images / "circle"), str(images / "*" / "*_0001.png")]
    cli = cli_main(["predict", "--ckpt_path", str(checkpoint), "--images", *given, "--top_k", "3",
                    "--out_dir", str(tmp_path), "--name", "own", "--version", "p", *QUIET])
    rows = read_csv(tmp_path / "own" / "p" / "predictions_images.csv")
    circle = sorted((images / "circle").glob("*.png"))
    globbed = sorted(images.glob("*/*_0001.png"))
    expected = list(dict.fromkeys([images / "star" / "star_0003.png", *circle, *globbed]))  # each image once
    assert [row["path"] for row in rows] == [str(path) for path in expected]
    assert list(rows[0]) == ["index", "path", "prediction", "top1", "top1_prob", "top2", "top2_prob", "top3",
                             "top3_prob"]  # no label columns: the images have none
    classnames = cli.model.class_sets("predict")[0].classnames
    probabilities = reference_probabilities(checkpoint, expected, classnames)
    values, indices = probabilities.topk(3, dim=-1)
    for row, top_values, top_indices in zip(rows, values, indices):
        assert [row[f"top{k}"] for k in (1, 2, 3)] == [classnames[i] for i in top_indices.tolist()]
        assert [float(row[f"top{k}_prob"]) for k in (1, 2, 3)] == pytest.approx(top_values.tolist(), abs=1e-6)


def test_load_classifies_like_the_module_and_encodes_both_towers(checkpoint, data_root):
    paths = sorted(images_of(data_root).glob("*/*_0002.png"))
    model = mmprompt.load(checkpoint)
    probabilities = reference_probabilities(checkpoint, paths, model.classnames)
    predictions = model.classify([str(p) for p in paths[:-1]] + [Image.open(paths[-1])], top_k=2)  # paths or PIL
    values, indices = probabilities.topk(2, dim=-1)
    assert [p.labels for p in predictions] == [tuple(model.classnames[i] for i in row) for row in indices.tolist()]
    assert [p.probabilities for p in predictions] == pytest.approx([tuple(row) for row in values.tolist()], abs=1e-6)
    image, text = model.encode_images(paths), model.encode_text()
    assert image.shape == (len(paths), text.shape[1]) and text.shape[0] == len(model.classnames)
    assert torch.allclose(image.norm(dim=-1), torch.ones(len(paths)), atol=1e-5)
    scale = model.module.clip.logit_scale.exp()
    assert torch.allclose((scale * image @ text.t()).softmax(dim=-1), probabilities, atol=1e-5)
    assert torch.allclose(model.encode_text(["circle", "star"]), text[[model.classnames.index("circle"),
                                                                        model.classnames.index("star")]], atol=1e-6)
    chosen = mmprompt.load(checkpoint, classes=["star", "circle"])
    assert chosen.classnames == ("star", "circle") and {p.label for p in chosen.classify(paths)} <= {"star", "circle"}


def readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.search(r"<!-- readme-example[^>]*-->\n```python\n(.*?)```", text, re.S).group(1)


def test_the_readme_example_runs_as_written(checkpoint, data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo" / "version_0" / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, tmp_path / "runs" / "demo" / "version_0" / "checkpoints" / "last.ckpt")
    (tmp_path / "photos").mkdir()
    Image.open(images_of(data_root) / "circle" / "circle_0000.png").convert("RGB").save(tmp_path / "photos" / "cat.jpg")
    shutil.copy(images_of(data_root) / "star" / "star_0000.png", tmp_path / "photos" / "dog.png")
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert namespace["image_features"].shape[0] == 1 and namespace["text_features"].shape[0] == 2
    assert namespace["other"].classnames == ("circle", "star")


def test_zero_shot_on_images_with_a_class_file_and_one_overlay_per_image(data_root, tmp_path):
    (tmp_path / "names.txt").write_text("# shapes\ncircle\n\nstar\nsquare\n")
    paths = [images_of(data_root) / "circle" / "circle_0004.png", images_of(data_root) / "star" / "star_0004.png"]
    cli_main(["predict", "--config", "methods/zero_shot", "--config", "tiny", "--images", *map(str, paths),
              "--classes", str(tmp_path / "names.txt"), "--overlay", "true", "--out_dir", str(tmp_path),
              "--version", "p", *QUIET])
    run = tmp_path / "ZeroShot-images" / "p"  # named after the images, not the config's default dataset
    rows = read_csv(run / "predictions_images.csv")
    assert [row["prediction"] for row in rows] == ["circle", "star"]  # the bundled CLIP knows these shapes
    assert {row["top3"] for row in rows} <= {"circle", "star", "square"} and "top4" not in rows[0]
    assert sorted(p.name for p in (run / "overlays").iterdir()) == ["00000-circle_0004.png", "00001-star_0004.png"]


@pytest.mark.parametrize("case, message", [
    ("garbage", "--images: cannot read image {tmp}/bad.png"),
    ("truncated", "--images: cannot read image {tmp}/cut.png"),
    ("missing", "--images {tmp}/nowhere.png: no such file or folder"),
    ("empty_glob", "--images {tmp}/*.tif: the pattern matches no file"),
    ("no_classes", "--images without --ckpt_path is zero-shot: give the class names with --classes FILE"),
    ("repeated_class", "--classes {tmp}/names.txt repeats ['cat']"),
    ("untrained", "--images without --ckpt_path would classify with an untrained BiasTuning"),
    ("no_images", "--images needs at least one image file, folder or glob pattern"),
])
def test_bad_images_and_class_files_are_one_error_naming_them(case, message, data_root, tmp_path, capsys):
    (tmp_path / "bad.png").write_text("not an image")
    whole = (images_of(data_root) / "star" / "star_0000.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "names.txt").write_text("cat\ndog\ncat\n")
    good = str(images_of(data_root) / "circle" / "circle_0000.png")
    images = {"garbage": str(tmp_path / "bad.png"), "truncated": str(tmp_path / "cut.png"), "missing": str(tmp_path / "nowhere.png"),
              "empty_glob": str(tmp_path / "*.tif")}.get(case, good)
    images = [] if case == "no_images" else [images]
    (tmp_path / "good.txt").write_text("circle\nstar\n")
    names = tmp_path / ("names.txt" if case == "repeated_class" else "good.txt")
    classes = [] if case == "no_classes" else ["--classes", str(names)]
    method = "methods/bias" if case == "untrained" else "methods/zero_shot"
    status = main(["predict", "--config", method, "--config", "tiny", "--images", *images, *classes,
                   "--out_dir", str(tmp_path / "runs"), *QUIET])
    assert status == 2
    assert f"mmprompt: error: {message.format(tmp=tmp_path)}" in capsys.readouterr().err


def test_import_mmprompt_stays_light_and_load_is_imported_on_first_call():
    from test_layering import import_graph

    eager = [edge.target for edge in import_graph(REPO)["mmprompt"] if edge.eager]
    assert eager == [] and callable(mmprompt.load)  # `load` imports mmprompt.run.inference (torch) when called


def test_image_conditioned_text_has_no_image_free_features():
    from mmprompt.adapters import CoCoOp
    from mmprompt.classes import ClassSet
    from mmprompt.run.inference import Classifier

    module = PromptCLIPModule(CoCoOp(), model_name="mmprompt-tiny", pretrained=None)
    classifier = Classifier(module, ClassSet("images", ("circle", "star")), build_transform(False, 64))
    with pytest.raises(ValueError, match="CoCoOp conditions its text on each image"):
        classifier.encode_text()


def test_images_take_several_values_or_one_as_users_write_them():
    from mmprompt.run.argv import images_as_one_value

    assert images_as_one_value(["predict", "--images", "a.jpg", "dir/", "g/*.png", "--top_k", "3"]) == [
        "predict", "--images", '["a.jpg", "dir/", "g/*.png"]', "--top_k", "3"]
    assert images_as_one_value(["--images=a b.jpg"]) == ["--images", '["a b.jpg"]']
    assert images_as_one_value(["--images", "[a.jpg, b.jpg]"]) == ["--images", "[a.jpg, b.jpg]"]  # already a list
