"""Plain-text tables, the one layout every table compare.py prints uses: the first column left-aligned,
the others right-aligned, a dashed line under the header, two spaces between columns."""


def cell(value, scale: float = 1, fmt: str = "{:.3f}") -> str:
    """A number as text (divided by scale), or '-' when it was not measured."""
    return "-" if value is None else fmt.format(value / scale)


def format_columns(header: list[str], rows: list[list[str]]) -> list[str]:
    """The table's lines: header, dashes, rows. No rows, no table (an empty list)."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines
