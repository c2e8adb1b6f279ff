"""Griffe extensions for the API reference (enabled in mkdocs.yml; not part of the package).

``PublicDocstrings``: every public object the API pages render must have a docstring.

mkdocstrings hides members without a docstring (``show_if_no_docstring: false``), so a public
function, class, method or property that lost its docstring would silently vanish from the
reference. This extension reads the ``::: identifier`` directives of the API pages (``docs/api/*.md``,
with their ``members:`` option when present) and logs a warning for each public object they render
that has no docstring; ``mkdocs build --strict`` turns the warnings into a failed build.

Objects listed in the ``pending`` option (full paths, e.g. ``saehook.kernels.TopKEncode``) are
reported at INFO level only: docstrings owed by modules under active work elsewhere.

Checked: the rendered module or object itself, and recursively its public members that are
modules, classes, functions and properties (imported names count where the module's ``__all__`` lists
them). Attributes, dunder methods and ``@typing.overload`` stubs are not required to have docstrings.

``SphinxRoles``: the docstrings use Sphinx roles (``:class:`Hooked```, ``:meth:`~saehook.TopKSAE.encode```);
this turns them into mkdocstrings cross-references (``[`Hooked`][Hooked]``, resolved in the docstring's
scope by ``scoped_crossrefs``), so they render as links and a reference to nothing fails the build.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe
import yaml

_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const):`(?P<tilde>~?)(?P<target>[\w.]+)(?:\(\))?`"
)
_DIRECTIVE = re.compile(r"^:::\s*(?P<ident>[\w.]+)\s*$")
logger = griffe.get_logger("griffe_docstrings")


def _directives(pages: Path) -> list[tuple[str, list[str] | None, str]]:
    """``(identifier, members or None, page)`` for each ``::: identifier`` in the pages."""
    found = []
    for page in sorted(pages.glob("*.md")):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            m = _DIRECTIVE.match(line)
            if not m:
                continue
            block = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and not nxt.startswith((" ", "\t")):
                    break
                block.append(nxt)
            opts = yaml.safe_load("\n".join(block)) or {}
            members = (opts.get("options") or {}).get("members")
            found.append((m["ident"], members if isinstance(members, list) else None, page.name))
    return found


class PublicDocstrings(griffe.Extension):
    """Warn about public objects rendered by the API pages that have no docstring."""

    def __init__(self, pages: str = "docs/api", package: str = "saehook", pending: list[str] | None = None) -> None:
        self.pages = Path(pages)
        self.package = package
        # paths of objects whose docstring is known to be missing and owed (logged as INFO, not WARNING)
        self.pending = set(pending or ())

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != self.package:
            return
        seen: set[str] = set()
        self._missing: set[str] = set()
        directives = _directives(self.pages)
        if not directives:
            logger.warning(f"no '::: identifier' in {self.pages}/*.md (run mkdocs from the repository root)")
        for ident, members, page in directives:
            obj = self._lookup(pkg, ident)
            if obj is None:
                logger.warning(f"{page}: ::: {ident} names no object in {self.package}")
                continue
            if members is None:
                self._check(pkg, obj, page, seen, recurse=True)
            else:
                self._check(pkg, obj, page, seen, recurse=False)
                for name in members:
                    member = obj.members.get(name)
                    if member is None:
                        logger.warning(f"{page}: {ident} has no member {name!r}")
                        continue
                    self._check(pkg, self._target(pkg, member), page, seen, recurse=True)
        for path in sorted(self.pending - self._missing):
            logger.info(f"{path} is listed as pending in mkdocs.yml but is documented or not rendered: remove it")

    # ------------------------------------------------------------------ helpers
    def _lookup(self, pkg: griffe.Module, path: str) -> griffe.Object | None:
        parts = path.split(".")
        if parts[0] != pkg.name:
            return None
        obj: Any = pkg
        for part in parts[1:]:
            obj = self._target(pkg, obj).members.get(part) if obj is not None else None
        return self._target(pkg, obj) if obj is not None else None

    def _target(self, pkg: griffe.Module, obj: Any) -> Any:
        """An alias's target inside the package (followed by path), else the object itself."""
        hops = 0
        while obj is not None and obj.is_alias and hops < 10:
            target_path = obj.target_path
            if not target_path.startswith(pkg.name + ".") and target_path != pkg.name:
                return None  # re-exported from another package: not ours to check
            obj = pkg if target_path == pkg.name else self._lookup_plain(pkg, target_path)
            hops += 1
        return obj

    def _lookup_plain(self, pkg: griffe.Module, path: str) -> Any:
        obj: Any = pkg
        for part in path.split(".")[1:]:
            if obj is None:
                return None
            obj = obj.members.get(part)
            if obj is not None and obj.is_alias:
                obj = self._target(pkg, obj)
        return obj

    def _check(self, pkg, obj, page: str, seen: set[str], *, recurse: bool) -> None:
        if obj is None or obj.path in seen:
            return
        seen.add(obj.path)
        if obj.is_attribute and "property" not in obj.labels:
            return
        if obj.is_function and ("property" not in obj.labels) and obj.name.startswith("__"):
            return
        if not (obj.docstring and obj.docstring.value.strip()):
            where = f"{obj.relative_filepath}:{obj.lineno}" if obj.lineno else str(obj.relative_filepath)
            kind = "property" if "property" in obj.labels else obj.kind.value
            message = f"{where}: public {kind} {obj.path} has no docstring (rendered by docs/api/{page})"
            self._missing.add(obj.path)
            if obj.path in self.pending:
                logger.info(f"{message}; pending in mkdocs.yml")
            else:
                logger.warning(message)
        if not recurse or not (obj.is_module or obj.is_class):
            return
        for name, member in obj.members.items():
            if name.startswith("_"):
                continue
            if member.is_alias:
                # imported names: public only where a module's __all__ lists them; those are rendered
                if not (obj.is_module and name in (obj.exports or ())):
                    continue
                member = self._target(pkg, member)
                if member is None or member.is_module:
                    continue  # a submodule re-export has its own page
            elif obj.is_module and not member.is_public:
                continue
            if member.is_function and "overload" in member.labels:
                continue
            self._check(pkg, member, page, seen, recurse=True)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in docstrings into mkdocstrings cross-references."""

    def __init__(self, package: str = "saehook") -> None:
        self.package = package

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name != self.package:
            return
        stack: list[Any] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.docstring is not None and ":" in obj.docstring.value:
                obj.docstring.value = _ROLE.sub(lambda m, obj=obj: self._crossref(pkg, obj, m), obj.docstring.value)
            stack.extend(m for m in obj.members.values() if not m.is_alias)

    def _crossref(self, pkg: griffe.Module, obj: Any, m: re.Match) -> str:
        target = m["target"]
        shown = target.rsplit(".", 1)[-1] if m["tilde"] else target
        return f"[`{shown}`][{self._inherited(pkg, obj, target) or target}]"

    def _inherited(self, pkg: griffe.Module, obj: Any, name: str) -> str | None:
        """The full path of ``name`` when it is a member a class in scope inherits from a base class
        in the package (``scoped_crossrefs`` looks at a class's own members only), else None."""
        if "." in name:
            return None
        cls = obj if obj.is_class else obj.parent if obj.parent is not None and obj.parent.is_class else None
        if cls is None or name in cls.members:
            return None
        todo, hops = [cls], 0
        while todo and hops < 20:
            c, hops = todo.pop(0), hops + 1
            for base in c.bases:
                try:
                    path = c.parent.resolve(str(base))
                except Exception:  # noqa: BLE001 - a base outside the package
                    continue
                found = PublicDocstrings(package=self.package)._lookup(pkg, path)
                if found is None or not found.is_class:
                    continue
                if name in found.members:
                    return f"{found.path}.{name}"
                todo.append(found)
        return None
