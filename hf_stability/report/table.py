"""Tables, as plain text (the command line, ButterflyResult) or Markdown (the card), from one
renderer; and the summary table of a report, the same in both."""

from __future__ import annotations

from dataclasses import dataclass

from ..analysis.schema import Report
from .findings import format_value, spawn_findings


@dataclass
class Column:
    title: str
    left: bool = False  # text columns align left, numbers right


def render_table(columns: list[Column], rows: list[list[str]], markdown: bool = False) -> str:
    """``rows`` of cells under ``columns``: aligned text with a rule under the header, or a
    Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(c.title for c in columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max([len(c.title)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(w) if c.left else cell.rjust(w)
                         for cell, c, w in zip(cells, columns, widths)).rstrip()

    header = line([c.title for c in columns])
    return "\n".join([header, "-" * len(header)] + [line(row) for row in rows])


#: The summary's figures: (column title, key of the summary row's figures); aligned ones only with alignment.
SUMMARY_FIGURES = (
    ("L2 to parent", "l2"),
    ("L2 merged", "merged_l2"),
    ("L2 aligned", "aligned_l2"),
    ("loss barrier (eval)", "loss_barrier_eval"),
    ("loss barrier aligned", "aligned_loss_barrier_eval"),
    ("error barrier (eval)", "error_barrier_eval"),
    ("perplexity barrier (eval)", "perplexity_barrier_eval"),
    ("disagreement", "disagreement"),
    ("amplification", "amplification"),
)


def summary_table(report: Report, markdown: bool = False) -> str:
    """Per spawn step, the control (the noise floor) and the perturbed children (mean +- std,
    whether they end in another basin, how many cannot be told from the floor). Aligned figures
    only with alignment, the perplexity barrier only for a language model. A PEFT study's L2 is
    the adapters'; its merged models' L2 stands beside it, and the aligned L2 (of the merged
    models, which alignment permutes) is to be read against that one."""
    aligned = report.settings.alignment.method != "none"
    perplexity = report.settings.head.perplexity is not None
    peft = report.settings.peft is not None
    titles = {"l2": "L2 to parent (adapter)", "aligned_l2": "L2 aligned (merged)"} if peft else {}
    figures = [(titles.get(key, title), key) for title, key in SUMMARY_FIGURES
               if (aligned or not key.startswith("aligned_")) and (perplexity or not key.startswith("perplexity_"))
               and (peft or key != "merged_l2")]
    columns = [Column("spawn step"), Column("who", left=True)] + [Column(title) for title, _ in figures]
    columns.append(Column("at the floor"))
    separated = {(f.spawn_step, f.group): f.separated for f in spawn_findings(report)}
    several = len(report.groups()) > 1
    rows, floors_shown = [], set()
    for row in report.summary:
        if row.control and row.spawn_step not in floors_shown:  # one control per spawn step
            floors_shown.add(row.spawn_step)
            rows.append([str(row.spawn_step), "control (noise floor)"]
                        + [format_value(row.control.get(key)) for _, key in figures] + [""])
        if row.children:
            verdict = "another basin" if separated.get((row.spawn_step, row.group)) else "same basin"
            floor = row.indistinguishable_from_floor
            who = row.group if row.reference is not None or several else "children"
            rows.append([str(row.spawn_step), f"{who} ({verdict})"]
                        + [format_value(row.children.get(key)) for _, key in figures]
                        + [f"{floor} of {row.num_children}" if floor is not None else ""])
    return render_table(columns, rows, markdown)
