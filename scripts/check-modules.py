#!/usr/bin/env python3
"""Checks the crate's module graph (run by CI; exit 1 with the offending files named).

Rules (README "Layout"):
  1. No cycle between top-level modules of the library (`src/<module>.rs` or `src/<module>/`).
  2. Every import points down the pipeline: a module imports only modules of a lower rank in LAYERS.
  3. `onnx` imports only `util` and `error`; `deploy` and `client` never import `train` (nor `client`
     the server or the deployment code: it speaks the protocol).
  4. Only the binary (`src/main.rs`, `src/cli/`) prints: no print!/println!/eprint!/eprintln! in the
     library outside `#[cfg(test)]` code.

Usage: scripts/check-modules.py [--graph]   (--graph prints the edges found)
"""
import os
import re
import sys

# Lower rank first. `proto` and `inference_proto` are the generated gRPC code declared in lib.rs.
LAYERS = ["error", "util", "proto", "inference_proto", "data", "onnx", "model", "train", "deploy", "serve", "client", "app"]
FORBIDDEN = {
    "onnx": {m for m in LAYERS if m not in ("error", "util", "onnx")},
    "deploy": {"train"},
    "client": {"train", "deploy", "serve"},
}
BINARY = {"main.rs", "cli"}
# Exported macros live at the crate root but belong to a module.
MACROS = {"named_enum": "util"}
REF = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
PRINT = re.compile(r"\b(e?print(ln)?)!\s*\(")


def top_module(rel):
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".rs") else first


def strip_tests(text):
    """Drops `#[cfg(test)] mod ... { ... }` blocks (brace-matched) and line comments."""
    out, i = [], 0
    marker = re.compile(r"#\[cfg\(test\)\]\s*(pub\s+)?mod\s+\w+\s*\{")
    while True:
        m = marker.search(text, i)
        if not m:
            out.append(text[i:])
            break
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    return "\n".join(line.split("//")[0] for line in "".join(out).splitlines())


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    edges, problems = {}, []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, root)
            if rel == "lib.rs" or rel.split(os.sep)[0] in BINARY:
                continue
            mod = top_module(rel)
            if mod not in LAYERS:
                problems.append(f"src/{rel}: top-level module `{mod}` is not in the layer list {LAYERS}")
                continue
            code = strip_tests(open(path, encoding="utf-8").read())
            for target in sorted(set(MACROS.get(t, t) for t in REF.findall(code))):
                if target == mod or target in ("Error", "Result"):
                    continue
                edges.setdefault(mod, {}).setdefault(target, []).append(f"src/{rel}")
            if PRINT.search(code):
                problems.append(f"src/{rel}: prints (only the binary prints; return text or use tracing)")
    rank = {m: i for i, m in enumerate(LAYERS)}
    for src, targets in sorted(edges.items()):
        for dst, files in sorted(targets.items()):
            where = ", ".join(sorted(set(files)))
            if dst not in rank:
                problems.append(f"{where}: `{src}` imports unknown top-level module `{dst}`")
            elif dst in FORBIDDEN.get(src, set()):
                problems.append(f"{where}: `{src}` must not import `{dst}`")
            elif rank[dst] > rank[src]:
                problems.append(f"{where}: `{src}` imports `{dst}`, which is above it (imports point down)")
    # Cycles (rule 2 implies none, but say so explicitly with the path).
    def visit(node, stack, seen):
        for nxt in edges.get(node, {}):
            if nxt in stack:
                problems.append("cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, stack + [nxt], seen)

    seen = set()
    for m in LAYERS:
        if m not in seen:
            seen.add(m)
            visit(m, [m], seen)
    if "--graph" in sys.argv:
        for src, targets in sorted(edges.items(), key=lambda kv: rank.get(kv[0], 99)):
            print(f"{src:>8} -> {' '.join(sorted(targets, key=lambda t: rank.get(t, 99)))}")
    for p in dict.fromkeys(problems):
        print(p)
    if problems:
        print(f"module graph: {len(set(problems))} problem(s)")
        return 1
    print(f"module graph: ok ({len(edges)} modules, imports point down, onnx/deploy/client rules hold, only the binary prints)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
