"""`--where`: a user's predicate on hyperparameters, checked before it runs.

A predicate is one boolean expression over the columns of hp_wide (each axis's
value, `<axis>_level`, model_id, dataset, seed, sweep_id): comparisons, AND /
OR / NOT, IN lists, BETWEEN, IS [NOT] NULL, LIKE, arithmetic, CAST, CASE, and a
short list of scalar functions (SAFE_FUNCTIONS). Nothing else: no subquery, no
table function, no second statement, no comment that hides the rest of a query.

The check uses DuckDB's own parser. The statement
`SELECT model_id FROM hp_wide WHERE <predicate>` is parsed to its syntax tree
(json_serialize_sql); the tree must be exactly that statement with one
expression in the WHERE clause, and every node of the expression must be one
of the kinds above. Then that same text, and only it, runs on its own, and
the model ids it returns are bound as a parameter into the query that uses
them: the predicate is never pasted into another statement. What runs is
DuckDB's rendering of the checked tree (json_deserialize_sql), not the text
as typed.
"""

from __future__ import annotations

import difflib
import json

import duckdb

from fgm.warehouse import FgmError

SAFE_CLASSES = {"CONJUNCTION", "COMPARISON", "OPERATOR", "BETWEEN", "CONSTANT",
                "COLUMN_REF", "FUNCTION", "CAST", "CASE", "TYPE"}
SAFE_TYPES = {"INTEGER", "INT", "INT4", "INT8", "BIGINT", "SMALLINT", "TINYINT", "HUGEINT",
              "DOUBLE", "FLOAT", "FLOAT4", "FLOAT8", "REAL", "DECIMAL", "NUMERIC", "VARCHAR",
              "TEXT", "STRING", "BOOLEAN", "BOOL"}
# Operators DuckDB parses as functions, and plain scalar functions with no
# access to anything but their arguments.
SAFE_FUNCTIONS = {
    "+", "-", "*", "/", "//", "%", "^", "**",
    "~~", "!~~", "~~*", "!~~*", "~~~", "!~~~", "like_escape", "not_like_escape",
    "ilike_escape", "not_ilike_escape", "regexp_matches", "regexp_full_match",
    "abs", "sign", "round", "floor", "ceil", "ceiling", "trunc", "sqrt", "cbrt", "exp", "ln",
    "log", "log2", "log10", "pow", "power", "greatest", "least", "isnan", "isinf", "isfinite",
    "lower", "upper", "lcase", "ucase", "length", "strlen", "starts_with", "ends_with",
    "prefix", "suffix", "contains", "concat", "trim", "ltrim", "rtrim", "replace",
    "substring", "substr", "left", "right", "ifnull", "nullif", "coalesce",
}
BASE = "SELECT model_id FROM hp_wide WHERE "
_REFERENCE = BASE + "true"


def hp_columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    return list(con.sql("SELECT * FROM hp_wide LIMIT 0").columns)


MAX_LENGTH = 100_000     # characters of a predicate
MAX_DEPTH = 200          # nesting of its expression


def _tree(con: duckdb.DuckDBPyConnection, sql: str) -> dict:
    text = con.execute("SELECT json_serialize_sql(?::VARCHAR)", [sql]).fetchall()[0][0]
    return json.loads(text)


def _depth(node: object, level: int = 0) -> int:
    """How deep the syntax tree nests (iteratively: a hostile tree must not overflow
    Python's own stack)."""
    deepest, todo = level, [(node, level)]
    while todo:
        item, d = todo.pop()
        deepest = max(deepest, d)
        if isinstance(item, dict):
            todo += [(v, d + 1) for v in item.values() if isinstance(v, dict | list)]
        elif isinstance(item, list):
            todo += [(v, d + 1) for v in item if isinstance(v, dict | list)]
    return deepest


def _strip(node: object) -> object:
    """The tree without source positions (they differ between two spellings)."""
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items()
                if k not in ("where_clause",) and not k.startswith("query_location")}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _refuse(where: str, why: str, columns: list[str]) -> FgmError:
    return FgmError(f"--where {where!r}: {why}. A predicate is one boolean expression over "
                    f"the columns {', '.join(columns)} (comparisons, AND/OR/NOT, IN, BETWEEN, "
                    "IS NULL, LIKE, arithmetic, CASE and simple functions); see "
                    "docs/evaluation.md.")


def _check_expression(node: object, where: str, columns: list[str]) -> None:
    known = {c.lower() for c in columns}
    if isinstance(node, list):
        for v in node:
            _check_expression(v, where, columns)
        return
    if not isinstance(node, dict):
        return
    cls = node.get("class")
    if cls is not None:
        if cls not in SAFE_CLASSES:
            what = {"SUBQUERY": "a subquery", "STAR": "*", "PARAMETER": "a parameter",
                    "WINDOW": "a window function", "LAMBDA": "a lambda"}.get(cls, cls.lower())
            raise _refuse(where, f"{what} is not allowed in a predicate", columns)
        if cls == "FUNCTION":
            name = str(node.get("function_name", "")).lower()
            if (name not in SAFE_FUNCTIONS or node.get("schema") or node.get("catalog")
                    or node.get("filter") is not None or node.get("distinct")
                    or (node.get("order_bys") or {}).get("orders")):
                raise _refuse(where, f"the function {node.get('function_name')!r} is not "
                              "allowed in a predicate", columns)
        if cls == "TYPE" and (node.get("catalog") or node.get("schema") or str(
                node.get("type_name", "")).upper() not in SAFE_TYPES):
            raise _refuse(where, f"a cast to {node.get('type_name')!r} is not allowed in a "
                          f"predicate (types: {', '.join(sorted(SAFE_TYPES))})", columns)
        if cls == "COLUMN_REF":
            names = node.get("column_names") or []
            if len(names) != 1:
                raise _refuse(where, f"{'.'.join(names)!r}: name columns without a table",
                              columns)
            if names[0].lower() not in known:
                hint = difflib.get_close_matches(names[0], columns, n=1)
                extra = (f" (did you mean {hint[0]!r}?)" if hint else
                         f"; if {names[0]!r} is a value, quote it: '{names[0]}'")
                raise _refuse(where, f"no column {names[0]!r}{extra}", columns)
    for key, value in node.items():
        if key != "class":
            _check_expression(value, where, columns)


def checked_predicate(con: duckdb.DuckDBPyConnection, where: str) -> str:
    """The statement `SELECT model_id FROM hp_wide WHERE <where>`, once `where` is
    known to be one safe boolean expression (else an FgmError saying why)."""
    columns = hp_columns(con)
    if not where or not where.strip():
        raise _refuse(where, "the predicate is empty", columns)
    if len(where) > MAX_LENGTH:
        raise _refuse(where[:60] + "...", f"longer than {MAX_LENGTH:,} characters", columns)
    sql = BASE + where
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise _refuse(where, f"not valid SQL ({str(exc).splitlines()[0]})", columns) from None
    if len(statements) != 1:
        raise _refuse(where, "it holds more than one statement", columns)
    try:
        tree = _tree(con, sql)
    except RecursionError:
        raise _refuse(where, f"nested more than {MAX_DEPTH} deep", columns) from None
    if tree.get("error"):
        raise _refuse(where, f"not valid SQL ({tree.get('error_message', '')})", columns)
    if _depth(tree) > MAX_DEPTH:
        raise _refuse(where, f"nested more than {MAX_DEPTH} deep", columns)
    got, want = tree["statements"], _tree(con, _REFERENCE)["statements"]
    if len(got) != 1 or _strip(got[0]) != _strip(want[0]):
        raise _refuse(where, "it is more than an expression (a clause such as ORDER BY, "
                      "LIMIT, UNION or GROUP BY follows it)", columns)
    _check_expression(got[0]["node"].get("where_clause"), where, columns)
    # a function the warehouse file defines (a macro named like a built-in) is not
    # the built-in the check allowed
    defined = {r[0].lower() for r in con.execute(
        "SELECT function_name FROM duckdb_functions() WHERE NOT internal").fetchall()}
    used = _function_names(got[0]["node"].get("where_clause"))
    if defined & used:
        raise _refuse(where, f"the warehouse defines its own {sorted(defined & used)[0]!r}, "
                      "which a predicate does not call", columns)
    # what runs is DuckDB's own rendering of the checked tree, so nothing the parser
    # kept out of the tree (a clause it drops, say) can run
    return con.execute("SELECT json_deserialize_sql(?::JSON)", [json.dumps(tree)]).fetchall()[0][0]


def _function_names(node: object) -> set[str]:
    names, todo = set(), [node]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            if item.get("class") == "FUNCTION":
                names.add(str(item.get("function_name", "")).lower())
            todo += list(item.values())
        elif isinstance(item, list):
            todo += item
    return names


def model_ids_where(con: duckdb.DuckDBPyConnection, where: str) -> list[str]:
    """The ids of the models hp_wide selects with the user's predicate."""
    sql = checked_predicate(con, where)
    try:
        return [r[0] for r in con.execute(sql).fetchall()]
    except duckdb.Error as exc:
        raise _refuse(where, str(exc).strip().splitlines()[0], hp_columns(con)) from None
