"""Ships the repo-root `cli.py` as `wanlite/cli.py` in wheels (setuptools `package-dir` maps folders only)."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCli(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib) / "wanlite" / "cli.py"
            self.copy_file("cli.py", str(target))


setup(cmdclass={"build_py": BuildPyWithCli})
