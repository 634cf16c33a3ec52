"""ml/pipeline/local.py: what `python -m ml pipeline` prepares for its later steps while its trainer trains."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

CHECK = """
import sys
from mlflow.utils import requirements_utils
before = requirements_utils._MODULES_TO_PACKAGES
from ml.pipeline.local import warm_up_later_steps
warm_up_later_steps()
print(before is None, requirements_utils._MODULES_TO_PACKAGES is not None,
      all(m in sys.modules for m in ("mlflow.pyfunc", "ml.registry", "ml.promotion")))
"""


def test_warm_up_imports_the_later_steps_and_builds_mlflows_package_map() -> None:
    """After it, registering finds the modules imported and MLflow's package map built. The map is
    MLflow's private cache: if MLflow renames it, this fails, where the warm-up would only go quiet."""
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "True"], out.stderr[-2000:]
