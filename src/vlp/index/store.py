"""An index's metadata in SQLite: one row per item (its id in the vector index, image path, caption, key
and the collection's other columns), and the filters a search takes.

Filters are `column=value`, `column!=value`, `column<value` (and <=, >, >=) and `column in a,b,c`; a
column is one of the table's, and a value is compared as a number where the column holds numbers.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlp.errors import BadQuery

BASE_COLUMNS = ("id", "path", "caption", "key", "removed")
FILTER = re.compile(r"^\s*(?P<column>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>!=|<=|>=|=|<|>|\s+in\s+)\s*(?P<value>.*?)\s*$")


@dataclass
class Item:
    path: str
    caption: str = ""
    key: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def _column_type(values: Iterable[str]) -> str:
    """INTEGER, REAL or TEXT: the narrowest that holds every non-empty value."""
    kinds = set()
    for value in values:
        if value == "":
            continue
        try:
            int(value)
            kinds.add("INTEGER")
        except ValueError:
            try:
                float(value)
                kinds.add("REAL")
            except ValueError:
                return "TEXT"
    return "REAL" if "REAL" in kinds else "INTEGER" if kinds else "TEXT"


class Metadata:
    """The SQLite table `items` of an index folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, check_same_thread=False)

    @classmethod
    def create(cls, path: str | Path, items: Sequence[Item], ids: Sequence[int]) -> Metadata:
        extra = sorted({name for item in items for name in item.extra} - set(BASE_COLUMNS))
        types = {name: _column_type(item.extra.get(name, "") for item in items) for name in extra}
        store = cls(path)
        columns = ", ".join(f'"{name}" {types[name]}' for name in extra)
        store.db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, path TEXT, caption TEXT, key TEXT, "
                         f"removed INTEGER DEFAULT 0{', ' + columns if columns else ''})")
        store.insert(items, ids)
        return store

    def columns(self) -> dict[str, str]:
        return {row[1]: row[2] for row in self.db.execute("PRAGMA table_info(items)")}

    def insert(self, items: Sequence[Item], ids: Sequence[int]) -> None:
        columns = self.columns()
        extra = [name for name in columns if name not in BASE_COLUMNS]
        unknown = sorted({name for item in items for name in item.extra} - set(columns))
        if unknown:
            raise BadQuery(f"columns {', '.join(unknown)} are not among the index's ({', '.join(extra) or 'none'})")
        names = ["id", "path", "caption", "key", *extra]
        rows = [(i, item.path, item.caption, item.key, *(_value(item.extra.get(n, ""), columns[n]) for n in extra))
                for item, i in zip(items, ids, strict=True)]
        with self.db:
            self.db.executemany(f"INSERT INTO items ({', '.join(map(_quoted, names))}) VALUES "
                                f"({', '.join('?' * len(names))})", rows)

    def rows(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        names = list(self.columns())
        found = {}
        for start in range(0, len(ids), 900):  # SQLite's limit on bound parameters
            chunk = list(ids[start : start + 900])
            query = f"SELECT * FROM items WHERE id IN ({', '.join('?' * len(chunk))})"
            found.update({row[0]: dict(zip(names, row, strict=True)) for row in self.db.execute(query, chunk)})
        return found

    def matching(self, filters: Sequence[str]) -> list[int]:
        """The ids of the items that are not removed and pass every filter."""
        where, values = self.where(filters)
        return [row[0] for row in self.db.execute(f"SELECT id FROM items WHERE {where} ORDER BY id", values)]

    def where(self, filters: Sequence[str]) -> tuple[str, list[Any]]:
        columns = self.columns()
        clauses, values = ["removed = 0"], []
        for text in filters:
            match = FILTER.match(text)
            if not match:
                raise BadQuery(f"filter {text!r}: expected column=value, column>=value, ... or column in a,b")
            column, op, value = match["column"], match["op"].strip(), match["value"]
            if column not in columns or column == "removed":
                raise BadQuery(f"filter {text!r}: no column {column!r} (columns: "
                               f"{', '.join(c for c in columns if c != 'removed')})")
            if op == "in":
                options = [_value(v.strip(), columns[column]) for v in value.split(",") if v.strip()]
                if not options:
                    raise BadQuery(f"filter {text!r}: 'in' needs at least one value")
                clauses.append(f"{_quoted(column)} IN ({', '.join('?' * len(options))})")
                values += options
            else:
                clauses.append(f"{_quoted(column)} {'<>' if op == '!=' else op} ?")
                values.append(_value(value, columns[column]))
        return " AND ".join(clauses), values

    def with_keys(self, keys: Sequence[str]) -> set[int]:
        """The ids of the items (not removed) with these keys."""
        found: set[int] = set()
        for start in range(0, len(keys), 900):  # SQLite's limit on bound parameters
            chunk = list(keys[start : start + 900])
            query = f"SELECT id FROM items WHERE removed = 0 AND key IN ({', '.join('?' * len(chunk))})"
            found.update(row[0] for row in self.db.execute(query, chunk))
        return found

    def remove(self, ids: Sequence[int]) -> None:
        with self.db:
            self.db.executemany("UPDATE items SET removed = 1 WHERE id = ?", [(i,) for i in ids])

    def removed(self) -> set[int]:
        return {row[0] for row in self.db.execute("SELECT id FROM items WHERE removed = 1")}

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM items WHERE removed = 0").fetchone()[0]

    def next_id(self) -> int:
        return (self.db.execute("SELECT MAX(id) FROM items").fetchone()[0] or -1) + 1

    def keys(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT key FROM items WHERE removed = 0")}

    def close(self) -> None:
        self.db.close()


def _quoted(name: str) -> str:
    return f'"{name}"'


def _value(text: str, kind: str) -> Any:
    if kind == "INTEGER":
        try:
            return int(text)
        except ValueError:
            pass
    if kind in ("INTEGER", "REAL"):
        try:
            return float(text)
        except ValueError:
            return None if text == "" else text
    return text
