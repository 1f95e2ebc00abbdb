import importlib.util
from pathlib import Path

import yaml

from c2srepro._cache import sha256_file

MANIFEST = Path(__file__).resolve().parents[1] / "data" / "manifest.yml"


def test_installed_package_files_match_the_manifest():
    entries = [e for e in yaml.safe_load(MANIFEST.read_text())["inputs"] if e["kind"] == "package-file"]
    assert len(entries) >= 5
    for entry in entries:
        # locate the package without importing it (pyenrichr's import needs matplotlib)
        spec = importlib.util.find_spec(entry["module"])
        assert spec is not None, f"{entry['package']} is not installed"
        path = Path(spec.submodule_search_locations[0]) / entry["path"]
        assert sha256_file(path) == entry["sha256"], f"{entry['name']}: {path} differs from the manifest"


def test_tokenizer_entry_matches_the_code():
    from c2srepro.data import tokenizer

    (entry,) = [e for e in yaml.safe_load(MANIFEST.read_text())["inputs"] if e["name"] == "pythia-tokenizer"]
    assert entry["sha256"] == tokenizer.PYTHIA_SHA256
    assert f"{entry['package']}=={entry['version']}" == tokenizer.PYTHIA_WHEEL
    assert entry["path"] == tokenizer.PYTHIA_MEMBER
