"""What an export holds: counts by expert, group, answer and split, what was skipped and why.

:func:`summarize` computes the counts, :func:`format_summary` the text table (``summary.txt``, also
printed) and :func:`draw_summary` the bar chart (``summary.png``, drawn with PIL). Sources in the
summary are hashed: it is part of the export, which must not name patients. A skip reason that the
export's privacy scan would flag (an error message quoting a value) is replaced by
:data:`WITHHELD_REASON`, so that dropping a record never makes the export fail its own check.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from vila_m3.data.balance import TRAIN, Placed
from vila_m3.data.privacy import hashed_id, scan_text
from vila_m3.data.sources import Skip

SECTIONS = (("by_expert", "records by expert"), ("by_group", "records by group"),
            ("by_answer", "records by answer"), ("by_split", "records by split"))
WITHHELD_REASON = "left out (the reason is withheld: it quoted a value the privacy scan flags)"


def _bump(table: dict[str, dict[str, int]], key: str, item: Placed) -> None:
    row = table.setdefault(key, {"total": 0, "train": 0, "val": 0, "train_listed": 0})
    row["total"] += 1
    row[item.split] += 1
    if item.split == TRAIN:
        row["train_listed"] += item.repeats


def summarize(placed: Iterable[Placed], skips: Iterable[Skip], seed: int, identifiers: Iterable[str] = (),
              **extra: Any) -> dict[str, Any]:
    """Counts of placed records (unique ones, and train as listed with repeats) and the skips (hashed sources).

    ``identifiers``: values the export must not hold; a skip reason holding one, or anything else the
    privacy scan flags, is replaced by :data:`WITHHELD_REASON`. ``extra`` values (duplicates removed,
    corrected chat turns, ...) are kept under ``notes``.
    """
    identifiers = set(identifiers)
    tables: dict[str, dict[str, dict[str, int]]] = {"by_expert": {}, "by_group": {}, "by_answer": {}, "by_split": {}}
    for item in placed:
        record = item.record
        _bump(tables["by_expert"], record.category, item)
        _bump(tables["by_group"], f"{record.category} / {record.group}", item)
        _bump(tables["by_answer"], f"{record.category} / {record.kind}: {record.answer}", item)
        _bump(tables["by_split"], item.split, item)
    for name, table in tables.items():
        tables[name] = dict(sorted(table.items()))
    skipped = [{"source": hashed_id(seed, "source", skip.source), "kind": skip.kind,
                "reason": WITHHELD_REASON if scan_text(skip.reason, "", identifiers, whole_value=True) else skip.reason}
               for skip in skips]
    return {**tables, "skipped": skipped, "notes": dict(extra)}


def format_summary(summary: dict[str, Any], title: str = "VILA-M3 expert-training conversations") -> str:
    """The summary as a text table (ends with a newline)."""
    lines = [title, ""]
    for key, heading in SECTIONS:
        table = summary[key]
        width = max([len(heading), *(len(name) + 2 for name in table)])
        lines.append(f"{heading:<{width}}  {'total':>7} {'train':>7} {'val':>7} {'train listed':>13}")
        for name, row in table.items():
            lines.append(f"  {name:<{width - 2}}  {row['total']:>7} {row['train']:>7} {row['val']:>7} "
                         f"{row['train_listed']:>13}")
        if not table:
            lines.append("  (none)")
        lines.append("")
    lines.append(f"skipped: {len(summary['skipped'])}")
    for skip in summary["skipped"]:
        lines.append(f"  {skip['source']}  {skip['kind']:<6} {skip['reason']}")
    notes = summary.get("notes") or {}
    if notes:
        lines.append("")
        lines += [f"{name.replace('_', ' ')}: {value}" for name, value in notes.items()]
    return "\n".join(lines) + "\n"


def draw_summary(summary: dict[str, Any], path: Path, title: str = "VILA-M3 expert-training conversations") -> Path:
    """A horizontal bar chart of the four count tables (unique records; train also as listed), as PNG."""
    font = _font(13)
    rows: list[tuple[str, str, int, int]] = []  # (kind, label, value, listed)
    for key, heading in SECTIONS:
        rows.append(("heading", heading, 0, 0))
        for name, row in summary[key].items():
            rows.append(("bar", name, row["total"], row["train_listed"]))
    row_height, label_width, bar_width, margin = 20, 330, 420, 12
    height = margin * 2 + 48 + row_height * len(rows)
    picture = Image.new("RGB", (margin * 2 + label_width + bar_width + 90, height), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((margin, margin), title, fill="black", font=_font(16))
    draw.text((margin, margin + 24), "dark: unique records; light: train records as listed (category repeats)",
              fill=(90, 90, 90), font=font)
    y = margin + 48
    section_max = 1
    for index, (kind, label, value, listed) in enumerate(rows):
        if kind == "heading":
            following = []
            for later in rows[index + 1:]:
                if later[0] == "heading":
                    break
                following.append(max(later[2], later[3]))
            section_max = max(following or [1])
            draw.text((margin, y + 2), label, fill="black", font=font)
        else:
            draw.text((margin + 12, y + 2), label[:48], fill=(40, 40, 40), font=font)
            left = margin + label_width
            if listed > value:
                draw.rectangle([left, y + 4, left + int(bar_width * listed / section_max), y + row_height - 4],
                               fill=(190, 210, 240))
            draw.rectangle([left, y + 4, left + int(bar_width * value / section_max), y + row_height - 4],
                           fill=(40, 90, 170))
            text = f"{value}" + (f" ({listed} listed)" if listed > value else "")
            draw.text((left + int(bar_width * max(value, listed) / section_max) + 6, y + 2), text, fill="black",
                      font=font)
        y += row_height
    path = Path(path)
    picture.save(path, format="PNG")
    return path


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1: one bitmap size
        return ImageFont.load_default()
