"""A toy book project laid out like the checkout's: its _quarto.yml keeps the real one's project
settings (the pre-render step, the staged chapters, the profile's output folder) around its own chapters."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_project(root: Path, chapters: list[str], *, title: str = "Toy") -> None:
    real = yaml.safe_load((ROOT / "_quarto.yml").read_text())
    project = {**real["project"], "pre-render": str(ROOT / real["project"]["pre-render"])}
    config = {"project": project, "profile": real["profile"], "metadata-files": real["metadata-files"],
              "book": {"title": title, "chapters": ["index.qmd"]}, "c2srepro": {"chapters": chapters},
              "execute": real["execute"]}
    (root / "_quarto.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "_quarto-default.yml").write_text((ROOT / "_quarto-default.yml").read_text())
