"""Device plumbing: every chapter that runs the model or the transcoders takes ``device`` and passes
it on, a profile's ``all: {device: ...}`` reaches each of them, an unavailable device is refused
before any chapter runs, and c2srepro moves tensors to the host only where it returns a result."""

import ast
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from c2srepro._device import FIX, resolve_device
from c2srepro.book import runner as book

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "c2srepro"
# The calls through which a chapter runs the model or the transcoders on a device.
DEVICE_CALLS = {"model_stage", "transcoders", "load_c2s_model", "load_transcoders", "TrainConfig", "ReplacementModel.load"}


def _chapter_calls(path: Path) -> list[ast.Call]:
    """The DEVICE_CALLS in a notebook's code cells (Quarto's ``#|`` options are comments)."""
    calls = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            for node in ast.walk(ast.parse("".join(cell["source"]))):
                if isinstance(node, ast.Call):
                    func = node.func
                    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                    if name in DEVICE_CALLS or (name == "load" and ast.unparse(func).endswith("ReplacementModel.load")):
                        calls.append(node)
    return calls


def _device_chapters() -> dict[str, list[ast.Call]]:
    chapters = [c for c in book.chapter_files(ROOT) if c.endswith(".ipynb")]
    found = {book.chapter_name(c): _chapter_calls(ROOT / c) for c in chapters}
    return {name: calls for name, calls in found.items() if calls}


def test_every_chapter_that_runs_the_model_declares_device_and_passes_it_on():
    import papermill

    chapters = _device_chapters()
    # 05, 09 and A2 read results only; every other chapter runs the model or the transcoders.
    assert set(chapters) == {"01-model", "02-transcoders", "03-validation", "04-features", "06-circuit",
                             "08-faithfulness", "A1-your-data"}
    for name, calls in chapters.items():
        declared = papermill.inspect_notebook(str(ROOT / "chapters" / f"{name}.ipynb"))
        assert "device" in declared, name
        assert declared["device"]["default"] == "None" and declared["device"]["inferred_type_name"] == "Optional[str]", name
        assert declared["device"]["help"].startswith("None: cuda when available, else cpu"), name
        for call in calls:
            passed = {k.arg: k.value for k in call.keywords}
            assert isinstance(passed.get("device"), ast.Name) and passed["device"].id == "device", (
                f"{name}: {ast.unparse(call)} does not pass device=device")


def test_a_profiles_device_reaches_every_chapter_that_runs_the_model():
    chapters = book.chapter_files(ROOT)
    declared = book.declared_parameters(ROOT, chapters)
    for value in ("cuda", "cpu"):
        layers = [{"all": {"device": value}, "chapters": {}}]
        for name in _device_chapters():
            assert book.resolve_parameters(declared[name], name, layers)["device"] == value, name
    # The GPU profiles put every such chapter on cuda; --set device=cpu takes them back to the CPU.
    for profile in ("c2s-scale-2b", "paper"):
        layers = [book.load_profile(ROOT, profile)]
        for name in _device_chapters():
            assert book.resolve_parameters(declared[name], name, layers)["device"] == "cuda", (profile, name)
            cpu = [*layers, book.parse_overrides(["device=cpu"], chapters)]
            assert book.resolve_parameters(declared[name], name, cpu)["device"] == "cpu", (profile, name)


def test_none_is_cuda_when_available_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")


def test_cuda_without_cuda_is_refused_with_the_parameter_and_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"TrainConfig.device='cuda': this machine has no CUDA device.*set device: cpu"):
        resolve_device("cuda", parameter="TrainConfig.device")
    with pytest.raises(ValueError, match="is not a torch device"):
        resolve_device("gpu")
    from c2srepro.models.load import load_c2s_model

    with pytest.raises(ValueError, match="device='cuda'"):  # before any weight is read: the path does not exist
        load_c2s_model(ROOT / "no-such-model", device="cuda")


def test_the_runner_refuses_an_unavailable_device_before_any_chapter_runs(monkeypatch):
    import papermill

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("a chapter ran"))
    results = ROOT / "results" / "smoke"
    before = sorted(results.rglob("*")) if results.exists() else None
    with pytest.raises(ValueError) as refused:
        book.execute_chapters(ROOT, "smoke", overrides=["device=cuda"])
    message = str(refused.value)
    assert message.count("device=") == 2 and "--set device=cuda sets device='cuda'" in message
    assert "for chapter(s) 01-model, 02-transcoders, 03-validation, 04-features, 06-circuit, 08-faithfulness" in message
    assert "no CUDA device" in message and message.endswith(FIX)
    assert (sorted(results.rglob("*")) if results.exists() else None) == before  # nothing written

    chapters = book.chapter_files(ROOT)
    declared = book.declared_parameters(ROOT, chapters)
    sources = ["profile 'c2s-scale-2b' (chapters/profiles/c2s-scale-2b.yml)", "--set"]
    with pytest.raises(ValueError, match=r"c2s-scale-2b.yml\) under all: sets device='cuda' for chapter\(s\) 01-model"):
        book.check_devices([book.load_profile(ROOT, "c2s-scale-2b"), book.parse_overrides([], chapters)], declared,
                           sources=sources)
    with pytest.raises(ValueError, match=r"--set 06-circuit.device=cuda sets device='cuda' for chapter\(s\) 06-circuit, but"):
        book.check_devices([book.load_profile(ROOT, "default"), book.parse_overrides(["06-circuit.device=cuda"], chapters)],
                           declared, sources=sources)
    # Passes: the fix the message names, a profile without a device, and cuda where there is one.
    book.check_devices([book.load_profile(ROOT, "c2s-scale-2b"), book.parse_overrides(["device=cpu"], chapters)],
                       declared, sources=sources)
    book.check_devices([book.load_profile(ROOT, "smoke"), book.parse_overrides([], chapters)], declared, sources=sources)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    book.check_devices([book.load_profile(ROOT, "c2s-scale-2b"), book.parse_overrides([], chapters)], declared,
                       sources=sources)


# --------------------------------------------------------------------------- no hidden host moves

# Every function of c2srepro that moves a tensor to the host (``.cpu()``, ``.numpy()``,
# ``.to("cpu")``), with how many such calls it makes and why each is a result, not a detour. A
# move anywhere else, or one more in a listed function, fails: keep the tensor on its device, or
# list it here with the reason it is a result.
HOST_MOVES = {
    # Results: computed on the device, moved once at the end.
    "models/predict.py:score_labels": (2, "the [sentence, candidate] scores, once after the last batch"),
    "biology/benchmark.py:readout_scores": (2, "the [sentence, readout] table, once after the last batch"),
    "biology/benchmark.py:readout_gradient_x_input": (2, "the per-token scores it returns as a pandas Series"),
    "biology/benchmark.py:target_dla": (2, "the per-token DLA it returns as a pandas Series"),
    "biology/faithfulness.py:direct_logit_attribution": (2, "the per-token DLA it returns as a pandas Series"),
    "attribution/intervene.py:SplicedModel.run": (2, "the clean and edited log-likelihoods of the returned result"),
    "features/collect.py:collect_feature_stats": (12, "the six per-layer statistics, once after the last batch"),
    "features/collect.py:_DensePairSums.result": (4, "the (feature, gene) sums, read once after the last batch"),
    "features/anndata.py:_reduced_activations": (4, ("each batch's rows of the [cell, d_tc] host result, which need not "
                                                     "fit on the device; the firing counts once at the end")),
    "features/collect.py:example_activations": (2, "each batch's activations of the asked-for features, the returned windows"),
    "transcoder/train.py:_Trainer.export": (1, "the trained transcoders, returned on the host as saved ones load"),
    "transcoder/harvest.py:model_fingerprint": (1, "a hash: the sums are taken on the host so it is alike on any device"),
    # By design on the host: storage, files and figures.
    "features/collect.py:_SparsePairSums.add": (4, ("the sparse (feature, gene) buffer lives in host memory "
                                                    "(2.5e8 pairs at the paper's scale)")),
    "transcoder/model.py:Transcoder.save": (1, "a safetensors file"),
    "transcoder/formats.py:_tensors": (1, "an export file (SAELens, circuit-tracer)"),
    "transcoder/train.py:_Trainer.save": (5, "a checkpoint file"),
    "attribution/full_graph.py:Graph.save": (2, "a safetensors file"),
    "attribution/plots.py:_drawn_graph": (2, "a networkx figure"),
    # The attribution graph is a host object (adjacency and node table): build_graph assembles it.
    "attribution/full_graph.py:build_graph": (8, ("the adjacency, constants and node-table columns of the returned Graph, "
                                                  "block by block so each frees device memory; and the influence estimate "
                                                  "that picks the next rows in the host loop over Node objects")),
    "attribution/full_graph.py:_feature_nodes": (3, "the active features' node-table columns, once per graph"),
    "attribution/full_graph.py:Graph.subgraph": (1, "a host Graph's kept rows of its pandas node table"),
    "attribution/full_graph.py:gene_view": (1, "a host Graph's influence column of the returned table"),
    "attribution/export.py:_top_genes": (1, "a host Graph's kept rows of its pandas node table"),
    "biology/benchmark.py:removal_estimate": (1, "a host Graph's total effects, as the returned Series"),
    "biology/cohort.py:cell_influence": (2, "a host Graph's pruned membership and influence, as the returned table"),
}


def host_moves(source: str) -> Counter:
    """Per function (``Class.method``), its calls that move a tensor to the host."""
    found: Counter = Counter()

    def moves(call: ast.Call) -> bool:
        if not isinstance(call.func, ast.Attribute):
            return False
        if call.func.attr in ("cpu", "numpy"):
            return not call.args
        if call.func.attr == "to":
            values = [*call.args[:1], *(k.value for k in call.keywords if k.arg == "device")]
            return any(isinstance(v, ast.Constant) and v.value == "cpu" for v in values)
        return False

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, [*scope, child.name])
                continue
            if isinstance(child, ast.Call) and moves(child):
                found[".".join(scope) or "<module>"] += 1
            visit(child, scope)

    visit(ast.parse(source), [])
    return found


def test_the_scan_finds_each_kind_of_host_move():
    source = '''
def f(x, y):
    a = x.cpu()
    b = y.to("cpu", torch.float64).numpy()
    return x.to(device="cpu"), x.to("cuda"), x.numpy(force=True), a, b

class C:
    def g(self, z):
        return [t.cpu() for t in z]
'''
    assert host_moves(source) == Counter({"f": 5, "C.g": 1})  # not x.to("cuda"); numpy(force=True) is one


def test_c2srepro_moves_tensors_to_the_host_only_where_it_returns_a_result():
    found = {f"{path.relative_to(PACKAGE).as_posix()}:{function}": n
             for path in sorted(PACKAGE.rglob("*.py")) for function, n in host_moves(path.read_text()).items()}
    unlisted = {k: n for k, n in found.items() if k not in HOST_MOVES}
    assert not unlisted, f"host moves in functions not in HOST_MOVES (keep these tensors on their device): {unlisted}"
    changed = {k: (found.get(k, 0), n) for k, (n, _) in HOST_MOVES.items() if found.get(k, 0) != n}
    assert not changed, f"(found, listed) host moves differ from HOST_MOVES; update the list with the reason: {changed}"
    assert all(reason.strip() for _, reason in HOST_MOVES.values())


def test_quarto_is_not_started_when_the_device_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(book.shutil, "which", lambda name: "/usr/bin/quarto")
    monkeypatch.setattr(book.subprocess, "run", lambda *a, **k: pytest.fail("quarto was started"))
    with pytest.raises(ValueError, match="--set device=cuda sets device='cuda'"):
        book.render(ROOT, "smoke", renderer="quarto", overrides=["device=cuda"])
