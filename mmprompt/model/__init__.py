"""The model side: the frozen CLIP, the seam its towers run through, and the LightningModules.

- ``backbone.py``: a frozen open_clip CLIP from a name and a tag or a local file (bundled tiny configs
  and weights included);
- ``attention.py``, ``encoders.py``: the seam, both towers block by block with per-layer injections;
- ``module.py``: `PromptCLIPModule`, a frozen CLIP plus one adapter; ``schedule.py``: its learning-rate
  schedule; ``checkpoint_io.py``: how its checkpoints are read and written (atomically);
- ``pretrain.py``: `PretrainCLIP` and its `WorldDataModule`, the ``mmprompt pretrain`` stage.

May import: `adapters`, `classes`, `results`, `files` (and the package's ``__version__``).
Never imports: `data`, `analysis`, `run`, `tools`.
One exception stands, with its reason in tests/test_layering.py: ``pretrain.py`` draws its captioned
scenes from ``data/world.py``.
"""
