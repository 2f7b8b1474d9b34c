#!/usr/bin/env python3
"""Validates coordkit's docker compose files without a Docker engine.

For each file given: parse the YAML, validate it against the Compose Specification JSON
schema (compose-spec.json, vendored next to this script), then check what coordkit's files
promise: a `name`, exactly three services, each with an image, a health check with a test
command and published ports, and every named volume declared.

Usage: compose/validate.py FILE...   (exit 0 if all are valid; else 1, one line per problem)
Needs: python3 with PyYAML and jsonschema >= 4 (Debian: python3-yaml python3-jsonschema).
"""
import json
import os
import sys

import jsonschema
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))


def problems(path, schema):
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        return [f"cannot parse: {e}".replace("\n", " ")]
    if not isinstance(doc, dict):
        return ["not a mapping at the top level"]
    out = []
    validator = jsonschema.Draft202012Validator(schema)
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
        where = "/".join(str(p) for p in err.path) or "(top)"
        out.append(f"schema: {where}: {err.message}")
    if out:
        return out
    if not doc.get("name"):
        out.append("no project `name`")
    services = doc.get("services") or {}
    if len(services) != 3:
        out.append(f"expected 3 services, found {len(services)}")
    declared = set((doc.get("volumes") or {}).keys())
    for name, svc in services.items():
        if not svc.get("image"):
            out.append(f"service {name}: no image")
        test = (svc.get("healthcheck") or {}).get("test")
        if not test or test == ["NONE"]:
            out.append(f"service {name}: no health check")
        if not svc.get("ports"):
            out.append(f"service {name}: no published ports")
        for vol in svc.get("volumes") or []:
            source = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if source and not source.startswith((".", "/")) and source not in declared:
                out.append(f"service {name}: volume {source!r} is not declared")
    return out


def main(paths):
    if not paths:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    with open(os.path.join(HERE, "compose-spec.json"), encoding="utf-8") as f:
        schema = json.load(f)
    bad = 0
    for path in paths:
        found = problems(path, schema)
        for p in found:
            print(f"{path}: {p}", file=sys.stderr)
        if found:
            bad += 1
        else:
            print(f"{path}: ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
