"""Only a build hook; the metadata is in setup.cfg. Built from a git checkout, the
package gets ``gblk/_build.py`` with the commit (``gblk_build_info{revision}``)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithRevision(build_py):
    def run(self) -> None:
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        import importlib.util

        spec = importlib.util.spec_from_file_location("_gblk_root", os.path.join(here, "gblk", "__init__.py"))
        assert spec is not None and spec.loader is not None
        root = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(root)
        rev = root.git_revision(os.path.join(here, ".git"))
        if rev:
            target = os.path.join(self.build_lib, "gblk", "_build.py")
            with open(target, "w") as f:
                f.write(f'"""Written at build time by setup.py."""\n\nREVISION = "{rev}"\n')


setup(cmdclass={"build_py": BuildWithRevision})
