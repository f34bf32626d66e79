"""`platform/` is a source root, never a package: `import platform` must stay the standard library's."""

import subprocess
import sys
import sysconfig
from pathlib import Path


def test_import_platform_is_the_standard_library():
    import platform

    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(platform.__file__).resolve().parent == stdlib
    assert platform.system()  # a function only the stdlib module has


def test_no_platform_package_in_the_repo():
    root = Path(__file__).resolve().parents[1]
    assert not (root / "platform" / "__init__.py").exists()


def test_importing_orchard_starts_no_engine():
    code = ("import sys, orchard, orchard.config, orchard.cli; "
            "heavy = [m for m in ('torch', 'ray', 'pyspark', 'flwr', 'mlflow') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
