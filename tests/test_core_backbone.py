"""Backbone loading from local files in every supported format, and clear errors for bad ones."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

from mmprompt.model.backbone import OPENAI_EXTRA_KEYS, load_clip, read_checkpoint_state_dict

SOURCE = "mmprompt-tiny-wide"  # a GELU config: OpenAI-format weights must switch it to QuickGELU


class _StateHolder(nn.Module):
    """A scriptable module whose state dict is exactly ``state``: stands in for OpenAI's archive."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, value in state.items():
            *path, leaf = key.split(".")
            module: nn.Module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_buffer(leaf, value.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.fixture(scope="module")
def quick_gelu_model():
    torch.manual_seed(0)
    return load_clip(SOURCE, force_quick_gelu=True)


def _openai_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    state.update({"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
                  "vocab_size": torch.tensor(49408)})
    return state


def _write(path, kind: str, model: nn.Module) -> None:
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(_StateHolder(_openai_state(model))), str(path))
    elif kind == "openai_state_dict":
        torch.save(_openai_state(model), path)
    elif kind == "open_clip_checkpoint":
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
                   path)
    else:
        torch.save(model.state_dict(), path)


@pytest.mark.parametrize("kind, is_openai", [
    ("torchscript", True), ("openai_state_dict", True), ("open_clip_checkpoint", False), ("state_dict", False),
])
def test_every_checkpoint_format_reproduces_the_saved_model(tmp_path, quick_gelu_model, kind, is_openai):
    path = tmp_path / f"weights-{kind}.pt"
    _write(path, kind, quick_gelu_model)
    state, detected_openai = read_checkpoint_state_dict(path)
    assert detected_openai is is_openai
    assert not set(OPENAI_EXTRA_KEYS) & set(state)
    loaded = load_clip(SOURCE, pretrained=str(path), force_quick_gelu=not is_openai)
    activations = {type(m) for m in loaded.modules() if isinstance(m, (QuickGELU, nn.GELU))}
    assert activations == {QuickGELU}, "OpenAI weights must run with QuickGELU"
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training
    images, text = torch.randn(2, 3, 32, 32), torch.randint(0, 49407, (2, 77))
    text[:, 10] = 49407
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), quick_gelu_model.encode_image(images))
        assert torch.equal(loaded.encode_text(text), quick_gelu_model.encode_text(text))


def test_plain_state_dict_keeps_the_configured_activation(tmp_path, quick_gelu_model):
    path = tmp_path / "plain.pt"
    _write(path, "state_dict", quick_gelu_model)
    loaded = load_clip(SOURCE, pretrained=str(path))
    assert not any(isinstance(m, QuickGELU) for m in loaded.modules())


def test_truncated_file_gives_a_clear_error(tmp_path, quick_gelu_model):
    path = tmp_path / "truncated.pt"
    _write(path, "torchscript", quick_gelu_model)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"could not read checkpoint .*truncated\.pt.*Expected an OpenAI TorchScript"):
        load_clip(SOURCE, pretrained=str(path))


def test_weights_of_another_architecture_are_rejected(tmp_path, quick_gelu_model):
    path = tmp_path / "wide.pt"
    _write(path, "state_dict", quick_gelu_model)
    with pytest.raises(ValueError, match=r"does not match architecture 'mmprompt-tiny'.*shape mismatches"):
        load_clip("mmprompt-tiny", pretrained=str(path))


def test_missing_file_and_unknown_model_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        load_clip(SOURCE, pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(ValueError, match="unknown model_name 'ViT-Q-99'.*mmprompt-tiny"):
        load_clip("ViT-Q-99")
