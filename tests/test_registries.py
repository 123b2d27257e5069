"""The registries are the single source: every registered method and dataset agrees with its config,
the docs tables, the report and the sweep, and every registered method trains only its own tensors.

Parametrised over the registries (timm's ``list_models()``), so a new method or dataset is tested
here without editing a list.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from mmprompt import methods as registry
from mmprompt.data.registry import PROTOCOLS, get_spec, protocol_datasets, specs, transfer_source
from mmprompt.methods import MethodInfo, RegistryError, methods, scan_methods
from mmprompt.tools import methods_table
from mmprompt.tools import report, sweep

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DOCS = REPO / "docs"
#: the methods shipped before the registry, in their report order (new methods may join anywhere)
SHIPPED = ("zero_shot", "coop", "cocoop", "vpt_deep", "text_deep", "ivlp", "maple", "bias", "coupled_bias")


def import_object(path: str) -> object:
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def adapter_config(info: MethodInfo) -> dict:
    return yaml.safe_load((CONFIGS / info.config).read_text())["model"]["adapter"]


def markdown_rows(text: str, header_start: str) -> list[list[str]]:
    """The cells of each body row of the Markdown table whose header line starts with ``header_start``."""
    lines = text[text.index(header_start):].split("\n\n", 1)[0].splitlines()[2:]
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in lines]


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# ---------------------------------------------------------------------- methods

def test_the_registry_read_from_source_equals_the_decorators():
    import mmprompt.adapters as adapters

    assert registry.registered() == methods()
    assert [name for name in registry.method_names() if name in SHIPPED] == list(SHIPPED)
    assert set(adapters.METHOD_CLASSES) == {info.label for info in methods()}
    assert all(getattr(adapters, info.label) is import_object(info.class_path) for info in methods())


@pytest.mark.slow
def test_reading_the_registry_imports_no_torch():
    code = ("import sys; from mmprompt.tools import report, sweep; from mmprompt.methods import methods; "
            "print(len(methods()), sweep.method_label('maple'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.split() == [str(len(methods())), "MaPLe", "False"]


@pytest.mark.parametrize("info", methods(), ids=lambda info: info.name)
def test_every_method_has_its_config_and_the_config_builds_its_class(info):
    config = adapter_config(info)
    assert import_object(config["class_path"]) is import_object(info.class_path)
    assert info.label == config["class_path"].rsplit(".", 1)[-1] == info.class_path.rsplit(".", 1)[-1]
    assert Path(info.config).stem == info.name  # the sweep finds configs/methods/<name>.yaml


def test_every_shipped_method_config_is_registered():
    assert {p.stem for p in (CONFIGS / "methods").glob("*.yaml")} == set(registry.method_names())


@pytest.mark.parametrize("info", methods(), ids=lambda info: info.name)
def test_every_method_trains_only_its_own_tensors_and_checkpoints_them(info, classes):
    from mmprompt.model.module import PromptCLIPModule, build_adapter

    torch.manual_seed(0)
    module = PromptCLIPModule(build_adapter(adapter_config(info)), model_name="mmprompt-tiny", pretrained=None)
    module.train()
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 1])
    logits = module(images, classes)
    assert logits.shape == (2, classes.num_classes) and torch.isfinite(logits).all()
    trainable = {f"adapter.{name}": p for name, p in module.adapter.named_parameters() if p.requires_grad}
    buffers = {f"adapter.{name}" for name, _ in module.adapter.named_buffers()}  # a cache model's cache, PromptSRC's running sum
    assert set(module.state_dict()) == set(trainable) | buffers  # the checkpoint: the adapter's tensors only
    # a tensor sized by the training set (Tip-Adapter-F's cache keys) is empty until `Adapter.prepare`
    if any(p.numel() for p in trainable.values()):
        F.cross_entropy(logits, labels).backward()
        assert all(p.grad is not None for p in trainable.values())
    assert all(p.grad is None for p in module.clip.parameters())


def test_docs_method_table_is_the_generated_one():
    """Every column but the parameter counts (checked on ViT-B/16 in test_core_adapters) is regenerated
    from the registry and the configs and must equal the docs: a new method's row is never hand-written."""
    text = (DOCS / "methods.md").read_text()
    counts = methods_table.counts_in_docs(text)
    assert list(counts) == registry.method_names()
    assert methods_table.docs_table(text) == methods_table.markdown(methods_table.method_rows(CONFIGS), counts), (
        "docs/methods.md lags the registry: run `mmprompt methods --update_docs docs/methods.md`")
    assert "coupled_bias" not in (DOCS / "protocols.md").read_text()  # points to `mmprompt methods` instead


def test_report_and_sweep_take_labels_and_order_from_the_registry():
    labels = [info.label for info in methods()]
    assert sorted(reversed(labels), key=report.method_order) == labels
    assert report.method_order("SomethingNew") == (len(labels), "somethingnew")
    assert [sweep.method_label(info.name) for info in methods()] == labels
    assert sweep.method_label("my_own_method") == "my_own_method"  # an unregistered config keeps its stem


def write_adapters(folder: Path, **files: str) -> Path:
    folder.mkdir()
    for name, text in files.items():
        (folder / f"{name}.py").write_text(text)
    return folder


def test_a_registration_is_read_from_a_new_file(tmp_path):
    folder = write_adapters(tmp_path / "adapters", lora=(
        "from ..methods import register_method\n\n\n"
        "@register_method('clip_lora', order=90)\nclass CLIPLoRA(Adapter):\n    pass\n"))
    (info,) = scan_methods(folder, "mmprompt.adapters")
    assert info == MethodInfo("clip_lora", "CLIPLoRA", "mmprompt.adapters.lora.CLIPLoRA", "methods/clip_lora.yaml", 90)


def test_a_new_method_gets_its_docs_row_from_its_file_and_config(tmp_path):
    folder = write_adapters(tmp_path / "adapters", my_method=(
        "@register_method('my_method', order=55)\nclass MyMethod(Adapter):\n    pass\n"))
    infos = sorted([*methods(), *scan_methods(folder, "mmprompt.adapters")], key=lambda info: info.sort_key)
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS / "methods", configs / "methods")
    (configs / "methods" / "my_method.yaml").write_text(
        "# My method: one gate per layer. Details follow.\nmodel:\n  adapter:\n"
        "    class_path: mmprompt.adapters.MyMethod\n    init_args:\n      depth: 3\n  lr: 0.01\n")
    rows = methods_table.method_rows(configs, infos)
    table = methods_table.markdown(rows)
    lines = table.splitlines()
    assert lines[0] == "| name | class | what it is | defaults (configs/methods/<name>.yaml) |"
    assert lines[2 + [row.info.name for row in rows].index("my_method")] == (
        "| `my_method` | `MyMethod` | My method: one gate per layer. | depth=3; SGD lr 0.01 |")
    assert [line.split(" | ")[0] for line in lines[2:]] == [f"| `{info.name}`" for info in infos]


def test_the_docs_table_is_rewritten_between_its_markers_only(tmp_path):
    text = (DOCS / "methods.md").read_text()
    stale = methods_table.with_docs_table(text, "| name |\n|---|\n| `old` |\n")
    assert methods_table.docs_table(stale) == "| name |\n|---|\n| `old` |\n"
    assert stale.replace("| name |\n|---|\n| `old` |\n", methods_table.docs_table(text)) == text
    assert methods_table.with_docs_table(stale, methods_table.docs_table(text)) == text
    with pytest.raises(ValueError, match="README.md: no methods table markers"):
        methods_table.docs_table((REPO / "README.md").read_text(), "README.md")


@pytest.mark.parametrize("config, message", [
    (None, r"method 'coop' \(mmprompt.adapters.coop.CoOp\) is registered but its default config .*coop.yaml does not exist"),
    ("model:\n  adapter:\n    class_path: mmprompt.adapters.CoOp\n", r"coop.yaml: start the config with a comment"),
    ("# CoOp.\nmodel:\n  lr: 0.1\n", r"coop.yaml: expected model.adapter.class_path"),
])
def test_a_method_config_the_table_cannot_read_is_named(tmp_path, config, message):
    (tmp_path / "methods").mkdir()
    if config is not None:
        (tmp_path / "methods" / "coop.yaml").write_text(config)
    coop = next(info for info in methods() if info.name == "coop")
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        methods_table.method_rows(tmp_path, [coop])


def in_fresh_python(*argv: str) -> list[str]:
    """``mmprompt ARGV`` in a new interpreter: its output lines, then whether it imported torch."""
    code = (f"import sys\nfrom mmprompt.run.commands import main\ntry:\n    main({list(argv)!r})\n"
            "except SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                          timeout=60).stdout.splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("argv, printed", [
    (["--help"], "export"), (["--version"], "mmprompt 0.1.0"), (["report", "--help"], "mmprompt report"),
    (["sweep", "--help"], "mmprompt sweep"), (["methods", "--help"], "mmprompt methods"),
], ids=" ".join)
def test_the_instant_commands_answer_without_importing_torch(argv, printed):
    """What answers at once must not pay torch's import (seconds): help, version, report, sweep, methods."""
    out = in_fresh_python(*argv)
    assert any(printed in line for line in out[:-1]) and out[-1] == "torch imported: False"


@pytest.mark.slow
def test_mmprompt_methods_lists_the_registry_without_importing_torch():
    lines = in_fresh_python("methods")
    assert [line.split()[:2] for line in lines[:-1]] == [[info.name, info.label] for info in methods()]
    assert lines[-1] == "torch imported: False"


@pytest.mark.parametrize("text, message", [
    ("NAME = 'x'\n@register_method(NAME)\nclass X: pass\n", r"a.py:2: register_method takes literal arguments"),
    ("@register_method('x', colour='red')\nclass X: pass\n", r"a.py:1: expected register_method\('<name>'"),
    ("@register_method('MaPLe')\nclass X: pass\n", "should be a lower-case identifier"),
    ("@register_method('x')\nclass X: pass\n@register_method('x')\nclass Y: pass\n", "'x' is registered twice"),
])
def test_bad_registrations_are_refused_naming_the_place(tmp_path, text, message):
    folder = write_adapters(tmp_path / "adapters", a=text)
    with pytest.raises(RegistryError, match=message):
        scan_methods(folder, "mmprompt.adapters")


def test_the_decorator_refuses_a_name_taken_by_another_class():
    decorate = registry.register_method("maple")
    with pytest.raises(RegistryError, match="'maple' is registered twice: mmprompt.adapters.maple.MaPLe and"):
        decorate(type("Impostor", (), {"__module__": "somewhere"}))


# ---------------------------------------------------------------------- datasets

@pytest.mark.parametrize("config", sorted((CONFIGS / "datasets").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_dataset_config_is_named_by_its_key(config):
    spec = get_spec(yaml.safe_load(config.read_text())["data"]["dataset"])
    assert spec.key == config.stem
    assert get_spec(spec.key) is spec


def test_every_dataset_has_a_config():
    assert {spec.key for spec in specs()} == {p.stem for p in (CONFIGS / "datasets").glob("*.yaml")}


def test_protocol_membership_lives_in_the_specs():
    eleven = protocol_datasets("base2new")
    assert len(eleven) == 11 and eleven[0] == "imagenet" == transfer_source()
    assert protocol_datasets("fewshot") == eleven
    assert protocol_datasets("cross_dataset") == eleven[1:]  # targets: all but the source
    assert protocol_datasets("domain_generalization") == ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    assert all(get_spec(key).test_only for key in protocol_datasets("domain_generalization"))
    assert sweep.PROTOCOL_DATASETS == {protocol: protocol_datasets(protocol) for protocol in PROTOCOLS}
    assert report.STANDARD_DATASETS == eleven and report.SOURCE_DATASET == sweep.SOURCE_DATASET == "imagenet"
    with pytest.raises(ValueError, match="unknown protocol 'base2novel'; datasets are listed for: base2new"):
        protocol_datasets("base2novel")


def test_a_spec_with_an_unknown_protocol_is_refused():
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"dataset 'EuroSAT': unknown protocols \['base_to_new'\]"):
        replace(get_spec("eurosat"), protocols=("base_to_new",))


def test_docs_dataset_table_follows_the_registry():
    rows = markdown_rows((DOCS / "datasets.md").read_text(), "| name (aliases) | key |")
    assert ticked(rows[-1][0]) == ["custom"]
    assert len(rows) - 1 == len(specs())
    for row, spec in zip(rows, specs()):
        name, *aliases = ticked(row[0])
        assert (name, tuple(aliases), "test only" in row[0]) == (spec.name, spec.aliases, spec.test_only)
        assert (ticked(row[1]), ticked(row[2]), row[5]) == ([spec.key], [spec.folder], spec.template)
        assert ticked(row[7]) == list(spec.protocols)
        assert ("source" in row[7]) == spec.transfer_source
