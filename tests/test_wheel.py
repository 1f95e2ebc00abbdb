"""A wheel built from the checkout works outside it: package data (the label map) included."""

import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASE_STUDY = textwrap.dedent("""
    import json
    import c2srepro
    from c2srepro.biology.casestudy import label_marker_terms, read_label_map
    terms = label_marker_terms("pbmc68k_reduced", "CD14+ Monocyte", "cellconsensus_L2")
    print(json.dumps({"file": c2srepro.__file__, "terms": list(terms), "rows": len(read_label_map())}))
""")


def test_wheel_installs_into_a_fresh_venv_and_reads_its_package_data(tmp_path):
    # Built from a copy of what the wheel is made of, so setuptools' build/ stays out of the checkout.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "c2srepro", source / "c2srepro", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(wheels), str(source)], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("c2srepro-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies come from this environment as a plain path entry: its .pth files (the
    # editable install of the checkout) are not run, so only the wheel's c2srepro can be found.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    result = subprocess.run([python, "-c", CASE_STUDY], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(found["file"]).is_relative_to(site), found["file"]
    assert found["rows"] > 0 and found["terms"], found
