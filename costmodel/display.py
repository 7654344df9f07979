"""How the model's results show themselves: quantities with their units, and short tables, as text
in a terminal (`str`, `repr`) and as HTML in a notebook (`_repr_html_`).

A `Prediction` shows its time, bound, traffic and rates, then its bytes per tensor and its time
terms; an `Explanation` shows one row per variant, fastest first, and why the winner wins. The
numbers stay inspectable on the objects themselves (`p.bytes_by_tensor`, `p.terms`, in bytes and
seconds); these functions only render them.

>>> format_bytes(134_217_728), format_seconds(2.34e-5), format_bytes_per_s(2.9e12)
('134.22 MB', '23.40 us', '2.90 TB/s')
"""

from __future__ import annotations

import html
from dataclasses import dataclass

__all__ = ["Table", "format_bytes", "format_seconds", "format_bytes_per_s", "format_flops",
           "format_flops_per_s", "format_prediction", "prediction_html", "format_explanation",
           "explanation_html"]


# ---------------------------------------------------------------------------------------------
# Quantities with units (decimal prefixes, as datasheets give bandwidths)
# ---------------------------------------------------------------------------------------------

def _scaled(value: float, units: tuple[tuple[str, float], ...], digits: int = 2, zero: str = "") -> str:
    if value == 0 and zero:
        return f"0 {zero}"
    for unit, scale in units:
        if abs(value) >= scale:
            return f"{value / scale:.{digits}f} {unit}"
    unit, scale = units[-1]
    return f"{value / scale:.{digits}f} {unit}"


def format_bytes(n: float) -> str:
    """Bytes in GB, MB, kB or B (decimal units)."""
    if abs(n) < 1e3:
        return f"{n:.0f} B"
    return _scaled(n, (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)))


def format_seconds(t: float) -> str:
    """A time in s, ms, us or ns, whichever keeps the number readable."""
    return _scaled(t, (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)), zero="us")


def format_bytes_per_s(r: float) -> str:
    """A bandwidth in TB/s from 1 TB/s up, else GB/s."""
    return _scaled(r, (("TB/s", 1e12), ("GB/s", 1e9)), zero="GB/s")


def format_flops(n: float) -> str:
    """A FLOP count in TFLOP, GFLOP or MFLOP (FLOP below a million)."""
    if abs(n) < 1e6:
        return f"{n:.0f} FLOP"
    return _scaled(n, (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)))


def format_flops_per_s(r: float) -> str:
    """A FLOP rate in TFLOP/s from 1 TFLOP/s up, else GFLOP/s."""
    return _scaled(r, (("TFLOP/s", 1e12), ("GFLOP/s", 1e9)), digits=1, zero="GFLOP/s")


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    """Lines of text above, a table, lines below. `align` has one letter per column, "l" or "r"
    (default: the first column left, the others right: names, then numbers)."""

    header: tuple[str, ...]
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    footer: tuple[str, ...] = ()
    align: str = ""

    def _left(self, i: int) -> bool:
        return self.align[i] == "l" if self.align else i == 0

    def text(self) -> str:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c)
                  for i, c in enumerate(self.columns)]

        def line(cells):
            return "  ".join(cell.ljust(w) if self._left(i) else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

        lines = [*self.header, line(self.columns), "  ".join("-" * w for w in widths)]
        lines += [line(r) for r in self.rows]
        return "\n".join([*lines, *self.footer])

    def html(self) -> str:
        esc = html.escape

        def cell(tag, i, text):
            style = "" if self._left(i) else ' style="text-align: right"'
            return f"<{tag}{style}>{esc(text)}</{tag}>"

        head = "".join(cell("th", i, c) for i, c in enumerate(self.columns))
        body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(r)) + "</tr>"
                       for r in self.rows)
        above = "".join(f"<p>{esc(t)}</p>" for t in self.header)
        below = "".join(f"<p>{esc(t)}</p>" for t in self.footer)
        return (f"<div>{above}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                f"{below}</div>")


# ---------------------------------------------------------------------------------------------
# A prediction
# ---------------------------------------------------------------------------------------------

def _prediction_tables(p) -> tuple[Table, Table]:
    launches = f"{p.launches} launch{'es' if p.launches != 1 else ''}"
    header = (
        f"{p.variant}: {format_seconds(p.time_s)} predicted, {p.bound}-bound "
        f"({launches}, {p.num_blocks} blocks, {p.waves:.2f} waves)",
        f"HBM traffic {format_bytes(p.hbm_bytes)} at {format_bytes_per_s(p.achieved_bytes_per_s)}"
        + (f" (plus {format_bytes(p.l2_hit_bytes)} of L2 hits)" if p.l2_hit_bytes else "")
        + f"; {format_flops(p.flops)} at {format_flops_per_s(p.achieved_flops_per_s)}",
    )
    total = sum(p.bytes_by_tensor.values())
    moved = [(k, v) for k, v in p.bytes_by_tensor.items() if v]
    idle = [k for k, v in p.bytes_by_tensor.items() if not v]
    byte_rows = tuple((k, format_bytes(v), f"{v / total:.1%}" if total else "-") for k, v in moved)
    bytes_table = Table(header, ("tensor", "bytes", "share"), byte_rows,
                        (f"(none moved: {', '.join(idle)})",) if idle else ())
    totals = [(k, v) for k, v in p.terms.items() if "." not in k]
    per_launch = len(p.terms) - len(totals)
    terms_table = Table(
        (), ("time term", "time"), tuple((k, format_seconds(v)) for k, v in totals),
        ("time_s = launch_s + max(memory_s, compute_s, schedule_s), summed over launches"
         + (f"; each launch's own terms in .terms['<launch>.<term>'] ({per_launch} more)"
            if per_launch else ""),))
    return bytes_table, terms_table


def format_prediction(p) -> str:
    """A Prediction as text: time, bound and rates, bytes per tensor, time terms."""
    return "\n".join(t.text() for t in _prediction_tables(p))


def prediction_html(p) -> str:
    """A Prediction as HTML, for a notebook."""
    return "".join(t.html() for t in _prediction_tables(p))


# ---------------------------------------------------------------------------------------------
# An explanation
# ---------------------------------------------------------------------------------------------

def _explanation_table(e, measured_s: "dict[str, float] | None" = None) -> Table:
    g = e.gpu
    header = (
        f"{e.workload.title or 'workload'}: {e.workload.describe()}",
        f"on {g.name} ({g.num_sms} SMs, {format_bytes_per_s(g.stream_bytes_per_s)}, "
        f"{format_flops_per_s(g.matmul_flops_per_s)}); baseline: {e.baseline} on the concatenated cache",
    )
    columns = ["variant", "time", "speedup", "HBM traffic", "achieved", "FLOPs", "blocks", "waves",
               "bound"]
    if measured_s is not None:
        columns.append("measured")
    columns.append("plan")
    rows = []
    for r in e.rows:
        p = r.prediction
        row = [r.variant, format_seconds(p.time_s), f"{r.speedup:.2f}x", format_bytes(p.hbm_bytes),
               format_bytes_per_s(p.achieved_bytes_per_s), format_flops(p.flops), str(p.num_blocks),
               f"{p.waves:.2f}", p.bound]
        if measured_s is not None:
            m = measured_s.get(r.variant)
            row.append(format_seconds(m) if m is not None else "-")
        row.append(r.plan)
        rows.append(tuple(row))
    align = "".join("l" if c in ("variant", "bound", "plan") else "r" for c in columns)
    return Table(header, tuple(columns), tuple(rows), (e.why,), align)


def format_explanation(e, measured_s: "dict[str, float] | None" = None) -> str:
    """The table: one line per variant, fastest first, then why the winner wins; `measured_s`
    (seconds by variant) adds a measured column."""
    return _explanation_table(e, measured_s).text()


def explanation_html(e, measured_s: "dict[str, float] | None" = None) -> str:
    """The same table as HTML, for a notebook."""
    return _explanation_table(e, measured_s).html()
