"""An import-linter contract type for parts of external packages (``ray.serve``, Ray's private
modules), which import-linter's own contracts cannot name: it records an external package as
its top level only, so this contract reads the import statements themselves.

    type = external_modules
    source_modules = serve_app.licensing    # packages, descendants included
    forbidden = ray.serve, vllm             # fnmatch patterns of dotted module names
    allowed_importers = serve_app.vllm_internals   # optional: modules exempt (a fence)

A statement matches when the module it names, or a name it imports from it, matches a pattern
or lies under one (``from ray.serve._private import replica`` is ``ray.serve._private``, and
``ray.serve._private.replica``). Direct imports only: the internal contracts check the chains.
"""

from __future__ import annotations

import fnmatch
import re

import grimp
from importlinter import Contract, ContractCheck, fields, output
from importlinter.domain.helpers import module_expressions_to_modules

_FROM = re.compile(r"^\s*from\s+([\w.]+)\s+import\s+\(?\s*([\w\s,.*]*)")
_IMPORT = re.compile(r"^\s*import\s+([\w\s,.]+)")


def named_modules(line: str) -> list[str]:
    """The dotted names an import statement may bring in."""
    if match := _FROM.match(line):
        module = match.group(1)
        names = [n.split(" as ")[0].strip() for n in match.group(2).split(",")]
        return [module] + [f"{module}.{n}" for n in names if n and n != "*"]
    if match := _IMPORT.match(line):
        return [n.split(" as ")[0].strip() for n in match.group(1).split(",") if n.strip()]
    return []


def matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"{pattern}.*")


class ExternalModulesContract(Contract):
    type_name = "external_modules"

    source_modules = fields.ListField(subfield=fields.ModuleExpressionField())
    forbidden = fields.ListField(subfield=fields.StringField())
    allowed_importers = fields.ListField(subfield=fields.ModuleExpressionField(), required=False)

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        allowed = {m.name for m in module_expressions_to_modules(
            graph, self.allowed_importers or [])}  # type: ignore[arg-type]
        sources = set()
        for module in module_expressions_to_modules(graph, self.source_modules):  # type: ignore[arg-type]
            sources |= {module.name} | graph.find_descendants(module.name)
        broken = []
        for importer in sorted(sources - allowed):
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                if not graph.is_module_squashed(imported):
                    continue  # one of ours: not this contract's business
                for detail in graph.get_import_details(importer=importer, imported=imported):
                    hits = [n for n in named_modules(detail["line_contents"])
                            for p in self.forbidden if matches(n, p)]  # type: ignore[attr-defined]
                    if hits:
                        broken.append((importer, detail["line_number"], detail["line_contents"]))
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for importer, line, text in check.metadata["broken"]:
            output.print_error(f"{importer}:{line}: {text.strip()}", bold=False)
