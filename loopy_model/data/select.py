"""Train-time selection: ``where="sync_conf >= 5 and yaw_abs_max <= 25"`` over manifest columns.

The curation job keeps every score of every clip (manifest.parquet, scores.parquet), so
thresholds can change at training time without rewriting shards: the selection only decides
which sample ids enter the epoch order. The expression is parsed by a small recursive-descent
parser into a pyarrow compute expression; nothing is ever passed to ``eval``.

Grammar (SQL-like, case-insensitive keywords; comparisons with null are false)::

    expr    := and_ ("or" and_)*
    and_    := not_ ("and" not_)*
    not_    := "not" not_ | pred
    pred    := sum [("=="|"="|"!="|"<>"|"<"|"<="|">"|">=") sum]
             | sum ["not"] "in" "(" literal ("," literal)* ")"
             | sum "is" ["not"] "null"
             | sum "between" sum "and" sum
    sum     := term (("+"|"-") term)*
    term    := unary (("*"|"/") unary)*
    unary   := "-" unary | atom
    atom    := number | 'string' | true | false | column | abs "(" expr ")" | "(" expr ")"
"""
from __future__ import annotations

import posixpath
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .index import DatasetIndex, open_fs

_TOKEN = re.compile(r"""\s*(?:
    (?P<num>\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)
  | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<>|<=|>=|[=<>(),+\-*/])
  )""", re.VERBOSE)
_KEYWORDS = {"and", "or", "not", "in", "is", "null", "true", "false", "between"}
_COMPARE = {"==": "equal", "=": "equal", "!=": "not_equal", "<>": "not_equal", "<": "less",
            "<=": "less_equal", ">": "greater", ">=": "greater_equal"}
_FUNCTIONS = {"abs": pc.abs}


def tokenize(text: str) -> list[tuple[str, object]]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"where: cannot parse at {text[pos:pos + 20]!r}")
        pos = m.end()
        if m["num"] is not None:
            tokens.append(("lit", float(m["num"]) if any(c in m["num"] for c in ".eE") else int(m["num"])))
        elif m["str"] is not None:
            tokens.append(("lit", re.sub(r"\\(.)", r"\1", m["str"][1:-1])))
        elif m["name"] is not None:
            word = m["name"].lower()
            if word in ("true", "false"):
                tokens.append(("lit", word == "true"))
            else:
                tokens.append(("kw", word) if word in _KEYWORDS else ("name", m["name"]))
        else:
            tokens.append(("op", m["op"]))
    return tokens


class _Parser:
    def __init__(self, text: str, columns: list[str]):
        self.tokens, self.i, self.columns = tokenize(text), 0, columns

    def peek(self, kind=None, value=None):
        if self.i >= len(self.tokens):
            return None
        tok = self.tokens[self.i]
        if (kind is None or tok[0] == kind) and (value is None or tok[1] == value):
            return tok
        return None

    def take(self, kind=None, value=None):
        tok = self.peek(kind, value)
        if tok is not None:
            self.i += 1
        return tok

    def expect(self, kind, value=None):
        tok = self.take(kind, value)
        if tok is None:
            got = self.tokens[self.i][1] if self.i < len(self.tokens) else "end of expression"
            raise ValueError(f"where: expected {value or kind}, got {got!r}")
        return tok

    def parse(self):
        expr = self.or_()
        if self.i != len(self.tokens):
            raise ValueError(f"where: unexpected {self.tokens[self.i][1]!r}")
        return expr

    def or_(self):
        expr = self.and_()
        while self.take("kw", "or"):
            expr = expr | self.and_()
        return expr

    def and_(self):
        expr = self.not_()
        while self.take("kw", "and"):
            expr = expr & self.not_()
        return expr

    def not_(self):
        if self.take("kw", "not"):
            return ~self.not_()
        return self.pred()

    def pred(self):
        left = self.sum_()
        tok = self.peek("op")
        if tok and tok[1] in _COMPARE:
            self.i += 1
            return getattr(pc, _COMPARE[tok[1]])(left, self.sum_())
        negate = bool(self.take("kw", "not"))
        if self.take("kw", "in"):
            self.expect("op", "(")
            values = [self.expect("lit")[1]]
            while self.take("op", ","):
                values.append(self.expect("lit")[1])
            self.expect("op", ")")
            expr = pc.is_in(left, value_set=pa.array(values))
            return ~expr if negate else expr
        if negate:
            raise ValueError("where: 'not' here must be followed by 'in'")
        if self.take("kw", "is"):
            negate = bool(self.take("kw", "not"))
            self.expect("kw", "null")
            return ~left.is_null() if negate else left.is_null()
        if self.take("kw", "between"):
            low = self.sum_()
            self.expect("kw", "and")
            return (left >= low) & (left <= self.sum_())
        return left

    def sum_(self):
        expr = self.term()
        while tok := (self.take("op", "+") or self.take("op", "-")):
            expr = expr + self.term() if tok[1] == "+" else expr - self.term()
        return expr

    def term(self):
        expr = self.unary()
        while tok := (self.take("op", "*") or self.take("op", "/")):
            expr = expr * self.unary() if tok[1] == "*" else expr / self.unary()
        return expr

    def unary(self):
        if self.take("op", "-"):
            return pc.negate(self.unary())
        return self.atom()

    def atom(self):
        if tok := self.take("lit"):
            return pc.scalar(tok[1])
        if self.take("op", "("):
            expr = self.or_()
            self.expect("op", ")")
            return expr
        tok = self.expect("name")
        name = tok[1]
        if self.peek("op", "("):
            if name.lower() not in _FUNCTIONS:
                raise ValueError(f"where: unknown function {name!r}; known: {sorted(_FUNCTIONS)}")
            self.take()
            arg = self.or_()
            self.expect("op", ")")
            return _FUNCTIONS[name.lower()](arg)
        if name not in self.columns:
            raise ValueError(f"where: unknown column {name!r}; columns: {sorted(self.columns)}")
        return pc.field(name)


def parse_where(text: str, columns: list[str]) -> pc.Expression:
    """Parse a selection expression into a pyarrow compute expression (never eval)."""
    return _Parser(text, columns).parse()


def read_table(root: str, name: str, storage_options: dict | None = None) -> pa.Table | None:
    fs, path = open_fs(root, storage_options)
    full = posixpath.join(path, name)
    if not fs.exists(full):
        return None
    with fs.open(full, "rb") as f:
        return pq.read_table(f)


def manifest_table(index: DatasetIndex) -> pa.Table | None:
    """manifest.parquet left-joined with scores.parquet on ``key`` (manifest columns win)."""
    manifest = read_table(index.uri, "manifest.parquet", index.storage_options)
    if manifest is None:
        return None
    scores = read_table(index.uri, "scores.parquet", index.storage_options)
    if scores is not None and "key" in scores.column_names:
        # list columns (identity_embedding: 512 values) are not filter material, and pyarrow cannot join them
        extra = [c for c in scores.column_names if c == "key" or (c not in manifest.column_names
                                                                  and not pa.types.is_nested(scores.schema.field(c).type))]
        scores = scores.select(extra)
        # scores has one row per candidate clip; keep the first row of a key if repeated
        _, first = np.unique(scores["key"].to_numpy(zero_copy_only=False), return_index=True)
        scores = scores.take(np.sort(first))
        manifest = manifest.join(scores, keys="key", join_type="left outer")
    return manifest


def select_samples(index: DatasetIndex, where: str | None, allow_smoke: bool = False) -> np.ndarray:
    """Sorted global ids of the samples that enter training.

    Without ``where`` every sample of the index is used. With it, the expression is evaluated
    over the manifest (+ scores) and rows are mapped to samples by ``key``. The manifest's
    per-sample ``profile`` column, when present, is checked against ``allow_smoke`` too.
    """
    table = manifest_table(index)
    if table is not None and "profile" in table.column_names and not allow_smoke:
        smoke = pc.sum(pc.equal(table["profile"], "smoke")).as_py() or 0
        if smoke:
            raise ValueError(f"{index.uri}: manifest lists {smoke} 'smoke' samples; pass allow_smoke=True")
    if table is None:
        if where:
            raise ValueError(f"where={where!r} needs {index.uri}/manifest.parquet, which does not exist")
        return np.arange(index.num_samples, dtype=np.int64)
    # The manifest is the selection: jobs/refilter.py can drop samples from it while their bytes
    # stay in the shards (index.json's "selection" says so), so without `where` it is used whole.
    if not where and "selection" not in index.raw:
        return np.arange(index.num_samples, dtype=np.int64)
    chosen = (table.filter(parse_where(where, table.column_names)) if where else table)["key"].to_pylist()
    lookup = index.key_to_gid()
    unknown = [k for k in chosen if k not in lookup]
    if unknown:
        raise ValueError(f"{len(unknown)} selected manifest keys are not in index.json, e.g. {unknown[:3]}")
    return np.unique(np.array([lookup[k] for k in chosen], dtype=np.int64))
