"""The field tables of the docs are the ones the schemas generate."""

from __future__ import annotations

import io
import json
import os
import re
from contextlib import redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from threshold import doctables
from threshold.config import CLIENT, SERVER
from threshold.schema import REQUIRED, Choice, Integer
from threshold.server.tunnels import TUNNEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(doc: str) -> str:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


class DocTablesTests(SynchronousTestCase):
    def test_tables_current(self):
        """Every marked table equals what its schema generates.

        On failure: ``python -m threshold.doctables --write`` and review the diff.
        """
        self.assertEqual(doctables.stale(ROOT), [])
        for doc in doctables.DOCS:
            text = read(doc)
            self.assertEqual(doctables.render(text), text, doc)

    def test_every_table_placed_once(self):
        """Each schema's table appears in exactly one document, exactly once."""
        placed = [
            name for doc in doctables.DOCS for name in doctables.tables_in(read(doc))
        ]
        self.assertEqual(sorted(placed), sorted(doctables.TABLES))

    def test_every_field_documented(self):
        """Every JSON name a schema accepts (aliases too) has a row in its table."""
        for name, schema in doctables.TABLES.items():
            table = schema.markdown()
            for json_name in schema.names:
                self.assertIn(f"| `{json_name}` |", table, name)
            for f in schema.fields:
                self.assertTrue(f.doc, f"{name}: {f.name} has no doc")

    def test_check_catches_an_edit(self):
        """A changed default in a document is found (the check can fail)."""
        text = read("docs/configuration.md")
        edited = text.replace("| `9056` |", "| `9000` |", 1)
        self.assertNotEqual(edited, text)
        self.assertNotEqual(doctables.render(edited), edited)
        self.assertEqual(doctables.render(edited), text)

    def test_main_check(self):
        """``--check`` exits 0 on the checkout and 1 on a stale copy."""
        self.assertEqual(doctables.main(["--check", "--root", ROOT]), 0)
        copy = self.mktemp()
        os.makedirs(os.path.join(copy, "docs"))
        for doc in doctables.DOCS:
            text = read(doc)
            if doc.endswith("api.md"):
                text = text.replace(
                    "| `ListenPort` | integer 1–65535 |", "| `ListenPort` | port |"
                )
            with open(os.path.join(copy, doc), "w", encoding="utf-8") as f:
                f.write(text)
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(doctables.main(["--check", "--root", copy]), 1)
            self.assertEqual(doctables.main(["--write", "--root", copy]), 0)
            self.assertEqual(doctables.main(["--check", "--root", copy]), 0)
        self.assertEqual(
            out.getvalue(),
            "docs/api.md: a field table differs from the schema; run --write\n"
            "docs/api.md: tables rewritten\n",
        )


class OpenApiTests(SynchronousTestCase):
    """docs/openapi.json describes the tunnel entry as its table does."""

    def test_tunnel_input(self):
        """Same fields, defaults, required fields and integer bounds."""
        spec = json.loads(read("docs/openapi.json"))
        schema = spec["components"]["schemas"]["TunnelInput"]
        properties = schema["properties"]
        self.assertEqual(set(properties), set(TUNNEL.names))
        choices = {
            name for choice in schema.get("anyOf", []) for name in choice["required"]
        }
        required = set(schema["required"]) | choices
        for f in TUNNEL.fields:
            prop = properties[f.json]
            # One of ClientIds and ClientId must be given: neither has a default.
            if f.default is REQUIRED or f.json in choices:
                self.assertIn(f.json, required)
                self.assertNotIn("default", prop, f.json)
            else:
                self.assertEqual(prop["default"], f.kind.to_json(f.default), f.json)
            if isinstance(f.kind, Choice):
                self.assertEqual(prop["enum"], list(f.kind.values), f.json)
            elif isinstance(f.kind, Integer):
                self.assertEqual(
                    (prop["minimum"], prop.get("maximum")),
                    (f.kind.low, f.kind.high),
                    f.json,
                )


_UNITS = {"": 1, "s": 1, "KiB": 1024, "MiB": 1024 * 1024}


def _number(text: str) -> float:
    """``16384``, ``1 MiB``, ``0 (off)``, ``10 s`` as a number."""
    match = re.match(r"\s*([0-9.]+)\s*(KiB|MiB|s)?\b", text)
    assert match is not None, text
    return float(match.group(1)) * _UNITS[match.group(2) or ""]


class SecurityLimitsTests(SynchronousTestCase):
    """docs/security.md's table of limits states the schemas' defaults."""

    def test_named_defaults(self):
        """Each row naming config fields gives their defaults, in order."""
        fields = {f.json: f for schema in (SERVER, CLIENT) for f in schema.fields}
        checked = 0
        for line in read("docs/security.md").splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 2:
                continue
            names = re.findall(r"`([A-Z][A-Za-z]+)`", cells[0])
            if not names or not all(name in fields for name in names):
                continue
            defaults = cells[1].split(" / ")
            self.assertEqual(len(defaults), len(names), line)
            for name, text in zip(names, defaults, strict=True):
                self.assertEqual(_number(text), fields[name].default, line)
                checked += 1
        self.assertGreater(checked, 10)
