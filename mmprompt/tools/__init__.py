"""The tools that work on configs and finished runs, each a ``mmprompt`` subcommand.

- ``report.py`` (with ``report_stats.py``, ``report_claims.py``, ``report_figures.py``): paper-style
  tables, intervals, claims and figures from run folders;
- ``sweep.py`` (with ``sweep_preset.py``, ``sweep_cluster.py``): a whole protocol of runs, resumable,
  locally or as a SLURM array;
- ``methods_table.py``: the method registry as a table (``mmprompt methods``, docs/methods.md);
- ``export.py``: a trained adapter for plain open_clip (``mmprompt export``).

The report, sweep and methods tools import without torch (tests/test_layering.py: TORCH_FREE); a
sweep starts each run as its own ``mmprompt`` process. Only ``run``'s small pieces (``shipped``,
``config``) are imported from the run side, never its command line.
May import: `methods`, `results`, `tables`, `files`, `data`, `adapters`, `model`, `run.shipped`, `run.config`.
Never imports: `run.cli`, `run.commands`.
"""
