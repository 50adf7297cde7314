"""Guard (issue 12, hostile files): the source tree (pipeline/, loopy_model/, jobs/, benchmarks/, schemas/)
never reads weights or arrays in a way that can run code, and never opens a weights file it has not verified.

Read with ``ast``, so comments and strings do not count:
* ``torch.load`` only with ``weights_only=True``; ``np.load`` only with ``allow_pickle=False``;
* no ``pickle`` / ``cPickle`` / ``joblib`` / ``dill`` / ``cloudpickle`` / ``shelve`` / ``marshal`` import;
* no ``trust_remote_code=True``;
* every call that opens a weights file (onnxruntime ``InferenceSession``, ``onnx.load``, ``torch.load``,
  ``torch.jit.load``, safetensors ``load_file`` / ``safe_open``, ``from_pretrained``) sits in a function that
  also calls the registry's check (``verified_file``, ``verified_tree``, ``verified_model_path``,
  ``verified_model_dir``); those that also take bytes built in memory (the smoke stand-ins) check every path.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["pipeline", "loopy_model", "jobs", "benchmarks", "schemas"]
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "joblib", "dill", "cloudpickle", "shelve", "marshal"}
OPENERS = {"InferenceSession", "load_file", "safe_open", "from_pretrained"}
QUALIFIED_OPENERS = {("onnx", "load"), ("onnx", "load_model"), ("torch", "load"), ("jit", "load")}
VERIFIERS = {"verified_file", "verified_tree", "verified_model_path", "verified_model_dir"}


def _sources():
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


def _name(node) -> tuple[str, ...]:
    """Dotted name of a call target: torch.jit.load -> ("torch", "jit", "load")."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return tuple(reversed(parts))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name and isinstance(k.value, ast.Constant):
            return k.value.value
    return None


def _is_opener(call: ast.Call) -> bool:
    name = _name(call.func)
    return bool(name) and (name[-1] in OPENERS or tuple(name[-2:]) in QUALIFIED_OPENERS)


def _enclosing_functions(tree):
    """(function node, calls inside it but not inside a function nested in it)."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            calls, stack = [], list(fn.body)
            while stack:
                node = stack.pop()
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    continue
                if isinstance(node, ast.Call):
                    calls.append(node)
                stack.extend(ast.iter_child_nodes(node))
            yield fn, calls


def test_no_pickle_capable_loading_in_the_source_tree():
    hits = []
    for path, tree in _sources():
        rel = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                hits += [f"{rel}:{node.lineno}: import {a.name}" for a in node.names
                         if a.name.split(".")[0] in PICKLE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
                hits.append(f"{rel}:{node.lineno}: from {node.module} import ...")
            elif isinstance(node, ast.Call):
                name = _name(node.func)
                if name[-2:] == ("torch", "load") and _kw(node, "weights_only") is not True:
                    hits.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
                if name[-2:] in (("np", "load"), ("numpy", "load")) and _kw(node, "allow_pickle") is not False:
                    hits.append(f"{rel}:{node.lineno}: np.load without allow_pickle=False")
                if _kw(node, "trust_remote_code") is True:
                    hits.append(f"{rel}:{node.lineno}: trust_remote_code=True")
    assert hits == [], "\n".join(hits)


def test_every_weights_opener_is_behind_the_sha256_check():
    unverified, openers = [], 0
    for path, tree in _sources():
        rel = path.relative_to(ROOT).as_posix()
        in_functions = set()
        for fn, calls in _enclosing_functions(tree):
            in_functions.update(id(c) for c in calls)
            opening = [c for c in calls if _is_opener(c)]
            openers += len(opening)
            verifies = any(_name(c.func)[-1:] and _name(c.func)[-1] in VERIFIERS for c in calls)
            if opening and not verifies:
                unverified += [f"{rel}:{c.lineno} in {fn.name}(): {'.'.join(_name(c.func))}" for c in opening]
        # openers at module or class level (outside any function) run unverified at import
        unverified += [f"{rel}:{c.lineno} outside any function: {'.'.join(_name(c.func))}" for c in ast.walk(tree)
                       if isinstance(c, ast.Call) and _is_opener(c) and id(c) not in in_functions]
    assert openers >= 15, "the scan found too few weights openers: it is not looking where the code is"
    assert unverified == [], "\n".join(unverified)
