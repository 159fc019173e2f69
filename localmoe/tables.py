"""Tables for people: columns aligned with spaces in a terminal, or Markdown to paste into a document."""


def render(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """`rows` under `header`, as a Markdown table or as space-aligned columns."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in lines)
