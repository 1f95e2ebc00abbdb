"""``quarto render``'s pre-render step (``_quarto.yml``): execute the book's chapters that changed.

Quarto runs this file with its own Python (``QUARTO_PYTHON``, else ``python3`` on PATH) in the
project's folder. Where that Python lacks c2srepro's dependencies and the checkout has the
``.venv`` that ``make env`` builds, the step re-runs itself with that environment's Python.
"""

import os
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
# Run as a file, this folder would come first on sys.path: import c2srepro from its checkout instead.
sys.path[0] = str(CHECKOUT)

try:
    import papermill  # noqa: F401  (the runner's one dependency a bare Python lacks)

    from c2srepro.book.runner import pre_render
except ImportError as error:
    venv = Path.cwd() / ".venv"
    venv_python = venv / "bin" / "python"
    if venv_python.is_file() and Path(sys.prefix).resolve() != venv.resolve():
        os.execv(venv_python, [str(venv_python), __file__, *sys.argv[1:]])
    sys.exit(f"the book's pre-render needs c2srepro's Python ({error}): run `make env`, or point "
             "QUARTO_PYTHON at a Python with c2srepro installed")

sys.exit(pre_render())
