"""A small, hostile-input-safe XML reader for vendor metadata (OME-XML, QPTIFF, Philips).

Built directly on expat with every dangerous feature refused rather than configured away:

* a document type declaration (``<!DOCTYPE``), entity declarations and external entity
  references raise :class:`XmlRejected` (no billion-laughs, no XXE, no external fetches);
  undefined entity references are expat errors;
* the XML declaration is stripped before parsing: vendors write ``encoding="utf-16"`` on text
  stored as 8-bit ASCII, and the caller has already decoded the text;
* size, element count and nesting depth are bounded.

The result is a tree of :class:`XmlNode` (namespace URI, local name, attributes, text). Error
messages never contain text from the document.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from xml.parsers import expat


class XmlRejected(Exception):
    """The XML is malformed, too large, or uses DTD/entity features."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message


@dataclass
class XmlNode:
    ns: str
    name: str
    attrs: dict[str, str]
    children: list[XmlNode] = field(default_factory=list)
    text: str = ""

    def iter(self) -> list[XmlNode]:
        out: list[XmlNode] = []
        stack = [self]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(reversed(node.children))
        return out

    def texts(self) -> list[str]:
        """Every non-empty attribute value and text of the subtree, stripped, in document
        order (each element's attributes before its text)."""
        out: list[str] = []
        for node in self.iter():
            out.extend(v.strip() for v in node.attrs.values())
            out.append(node.text.strip())
        return [t for t in out if t]


_DECL = re.compile(r"^\ufeff?\s*<\?xml[^>]*\?>", re.IGNORECASE)
_SEP = "\x1f"


def parse_xml(
    text: str, *, max_chars: int = 16 << 20, max_elements: int = 500_000, max_depth: int = 64
) -> XmlNode:
    """Parse ``text`` into an :class:`XmlNode` tree or raise :class:`XmlRejected`."""
    if len(text) > max_chars:
        raise XmlRejected("XML_TOO_LARGE", f"more than {max_chars} characters")
    body = _DECL.sub("", text, count=1)
    parser = expat.ParserCreate(encoding="UTF-8", namespace_separator=_SEP)
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    stack: list[XmlNode] = []
    root: list[XmlNode] = []
    count = 0

    def split(qname: str) -> tuple[str, str]:
        if _SEP in qname:
            ns, local = qname.split(_SEP, 1)
            return ns, local
        return "", qname

    def start(qname: str, attrs: dict[str, str]) -> None:
        nonlocal count
        count += 1
        if count > max_elements:
            raise XmlRejected("XML_TOO_LARGE", f"more than {max_elements} elements")
        if len(stack) >= max_depth:
            raise XmlRejected("XML_TOO_DEEP", f"elements nested deeper than {max_depth}")
        ns, local = split(qname)
        clean: dict[str, str] = {}
        for k, v in attrs.items():
            ans, alocal = split(k)
            clean[f"{{{ans}}}{alocal}" if ans else alocal] = v
        node = XmlNode(ns, local, clean)
        if stack:
            stack[-1].children.append(node)
        elif root:
            raise XmlRejected("XML_MALFORMED", "more than one root element")
        else:
            root.append(node)
        stack.append(node)

    def end(_qname: str) -> None:
        stack.pop()

    def chars(data: str) -> None:
        if stack:
            stack[-1].text += data

    def refuse_doctype(*_args: object) -> None:
        raise XmlRejected("XML_DTD", "document type declarations are not accepted")

    def refuse_entity(*_args: object) -> None:
        raise XmlRejected("XML_ENTITY", "entity declarations are not accepted")

    def refuse_external(*_args: object) -> int:
        raise XmlRejected("XML_ENTITY", "external entities are not accepted")

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.StartDoctypeDeclHandler = refuse_doctype
    parser.EntityDeclHandler = refuse_entity
    parser.UnparsedEntityDeclHandler = refuse_entity
    parser.ExternalEntityRefHandler = refuse_external
    try:
        parser.Parse(body.encode("utf-8"), True)
    except expat.ExpatError as exc:
        raise XmlRejected("XML_MALFORMED", f"expat error code {exc.code}") from exc
    except RecursionError as exc:  # pragma: no cover - depth is bounded above
        raise XmlRejected("XML_TOO_DEEP") from exc
    if not root:
        raise XmlRejected("XML_MALFORMED", "no root element")
    return root[0]


def escape_text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def escape_attr(value: str) -> str:
    return (
        escape_text(value)
        .replace('"', "&quot;")
        .replace("\n", "&#10;")
        .replace("\r", "&#13;")
        .replace("\t", "&#9;")
    )


def render(node: XmlNode, indent: str = "", step: str = "  ") -> str:
    """Serialise a namespace-free tree (text of elements with children is dropped)."""
    attrs = "".join(f' {k}="{escape_attr(v)}"' for k, v in node.attrs.items())
    if node.children:
        inner = "".join(render(c, indent + step, step) for c in node.children)
        return f"{indent}<{node.name}{attrs}>\n{inner}{indent}</{node.name}>\n"
    if node.text:
        return f"{indent}<{node.name}{attrs}>{escape_text(node.text)}</{node.name}>\n"
    return f"{indent}<{node.name}{attrs}/>\n"
