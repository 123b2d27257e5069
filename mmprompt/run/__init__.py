"""The run side: the ``mmprompt`` command, its Lightning stages and what a run leaves in its folder.

- ``commands.py``: the entry point (``mmprompt``, ``python -m mmprompt``): ``--help``, the tools by
  module name, the Lightning stages through ``cli.py`` (`LightningCLI`: fit, validate, test, predict,
  pretrain and the analysis aliases);
- ``guards.py``: the checks made before anything runs; ``config.py``: configs that stand alone
  (absolute paths, a checkpoint as ``--config``); ``shipped.py``: the shipped
  configs by name; ``launch.py``: one run folder for every rank under torchrun or SLURM;
- ``folder.py``: one live process per run folder, SIGTERM ends in a checkpoint; ``logs.py``: the
  CSV logger; ``predictions.py``: ``mmprompt predict``'s CSV files; ``inference.py``: ``mmprompt.load``
  and ``mmprompt predict --images``.

It sits on top: may import every layer below it, never the tools, which the entry point runs by name.
May import: `model`, `adapters`, `data`, `analysis`, `classes`, `results`, `tables`, `files`.
Never imports: `tools`.
"""
