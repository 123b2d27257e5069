"""Ships the top-level ``configs/`` inside the wheel as ``mmprompt/configs/`` (metadata: setup.cfg)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    """build_py that also copies configs/ into the built package, so `--config demo` works after pip install."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's configs/ directly
        target = Path(self.build_lib) / "mmprompt" / "configs"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(Path(__file__).parent / "configs", target, ignore=shutil.ignore_patterns("*.pyc"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
