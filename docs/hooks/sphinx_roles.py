"""Griffe extension: read tuco_lens's docstrings the way they are written.

Three conventions of the docstrings that griffe's Google parser does not know:

1. ``Example:`` (singular) opens an examples section, as in Napoleon: without this, griffe makes
   it an admonition and renders the ``>>>`` lines as nested block quotes. It becomes
   ``Examples:``, whose ``>>>`` blocks render as Python console code.
2. ``#:`` comments right above a module constant document it (Sphinx's convention); they
   become the constant's docstring, so the constant appears in the API reference.
3. Sphinx cross-reference roles become mkdocs-autorefs links (below).

Cross-references are Sphinx roles (``:func:`load_pair```, ``:class:`~tuco_lens.TuCoPair```).
mkdocstrings does not read roles, so this extension (listed under ``extensions`` of the
mkdocstrings python handler in mkdocs.yml) rewrites each role before the docstrings are parsed:

* the target is resolved the way Python would see it from the documented object (its own
  members, its module, then absolute paths), with griffe;
* a resolved target becomes an *optional* autoref: a link if the object is rendered somewhere on
  the site, plain code otherwise (private helpers), never a warning;
* an unresolvable target becomes plain code.

``~a.b.c`` shows ``c``; ``title <a.b.c>`` shows ``title``.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", flags=re.MULTILINE)
COMMENT_DOC = re.compile(r"^\s*#:\s?(?P<text>.*)$")
ROLE = re.compile(r":(?:py:)?(?P<kind>class|func|meth|attr|data|mod|exc|obj|const):`(?P<body>[^`]+)`")
TITLED = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$")


def _lookup(collection: Any, path: str) -> griffe.Object | griffe.Alias | None:
    try:
        return collection[path]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _resolve(obj: griffe.Object, kind: str, target: str) -> str | None:
    """The canonical path of ``target`` as seen from ``obj``, or None."""
    collection = obj.modules_collection
    found = _lookup(collection, target)
    if found is None:
        first, _, rest = target.partition(".")
        scope: griffe.Object | None = obj
        while found is None and scope is not None:
            try:
                base = scope.resolve(first)
            except (griffe.NameResolutionError, griffe.AliasResolutionError, ValueError):
                base = None
            if base is not None:
                found = _lookup(collection, f"{base}.{rest}" if rest else base)
            scope = scope.parent
    if found is None:
        return None
    # ``from .suffix_search import suffix_search`` in a package: griffe keeps the submodule under
    # that name, Python the function. A role naming a function means the function.
    name = target.rsplit(".", 1)[-1]
    try:  # an alias to a module outside the collection (e.g. transformer_lens) resolves to nothing
        if kind != "mod" and found.is_module and name in found.members:
            found = found.members[name]
        return found.canonical_path if not found.is_alias else found.final_target.canonical_path
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _rewrite(obj: griffe.Object, text: str) -> str:
    def replace(match: re.Match) -> str:
        body = match["body"].strip()
        titled = TITLED.match(body)
        if titled:
            title, target = titled["title"], titled["target"].strip()
        else:
            target = body
            title = body.lstrip("~")
            if body.startswith("~"):
                title = title.rsplit(".", 1)[-1]
        target = target.lstrip("~").rstrip("()")
        path = _resolve(obj, match["kind"], target)
        code = f"<code>{html.escape(title)}</code>"
        if path is None:
            return f"`{title}`"
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    return ROLE.sub(replace, text)


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if member.is_alias:
            continue
        yield from _walk(member)


def _comment_docstring(obj: griffe.Object) -> griffe.Docstring | None:
    """The ``#:`` comment lines right above an attribute, as its docstring (Sphinx convention)."""
    if not obj.is_attribute or obj.docstring is not None or not obj.lineno or obj.filepath is None:
        return None
    try:
        lines = obj.lines_collection[obj.filepath]
    except KeyError:
        return None
    found: list[str] = []
    index = obj.lineno - 2  # 0-based index of the line above the assignment
    while index >= 0 and (match := COMMENT_DOC.match(lines[index])):
        found.insert(0, match["text"])
        index -= 1
    if not found:
        return None
    return griffe.Docstring("\n".join(found), lineno=index + 2, endlineno=obj.lineno - 1, parent=obj)


class SphinxRoles(griffe.Extension):
    """Attribute comments, ``Example:`` sections and Sphinx roles, in every docstring of the package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if (comment := _comment_docstring(obj)) is not None:
                obj.docstring = comment
            if obj.docstring is not None and ":" in obj.docstring.value:
                text = EXAMPLE.sub(r"\g<indent>Examples:", obj.docstring.value)
                obj.docstring.value = _rewrite(obj, text)
