"""The page's HTML pieces: the stylesheet, a DataFrame as an escaped table, a mapping as a field/value table, a
matplotlib figure embedded as a base64 PNG (the page loads nothing else).

What belongs here: markup that knows nothing about super weights. Not here: which tables or figures a section
shows (`sections`, `analyses`, `census`).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from scsuperweight._fmt import num as _num
from scsuperweight.report.record import _plain
from scsuperweight.report.words import _e


def _cell(v, max_chars: int) -> tuple[str, bool]:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "", False
    if isinstance(v, (bool, np.bool_)):
        return _e(v), False
    if isinstance(v, (int, np.integer)):
        return _e(v), True
    if isinstance(v, (float, np.floating)):
        return _e(_num(v)), True
    s = str(v)
    if len(s) > max_chars:
        s = s[: max_chars - 1] + "…"
    return _e(s), False


def _html_table(df: pd.DataFrame, *, max_rows: int = 20, max_chars: int = 60, caption: str | None = None) -> str:
    """A DataFrame as an HTML table; every header and cell escaped, numbers right-aligned."""
    out = ["<div class='tw'><table>"]
    if caption:
        out.append(f"<caption>{caption}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in df.columns) + "</tr></thead><tbody>")
    for row in df.head(max_rows).itertuples(index=False):
        tds = []
        for v in row:
            txt, num = _cell(v, max_chars)
            tds.append(f"<td class='num'>{txt}</td>" if num else f"<td>{txt}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table></div>")
    if len(df) > max_rows:
        out.append(f"<p class='note'>Showing {max_rows} of {len(df)} rows; the full table is in the TSV.</p>")
    return "".join(out)


def _flatten(d, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for k, v in (d or {}).items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            rows += _flatten(v, name + ".")
        elif isinstance(v, (list, tuple)):
            rows.append((name, ", ".join(str(x) for x in v)))
        else:
            rows.append((name, "" if v is None else str(v)))
    return rows


def _kv_table(d, caption: str) -> str:
    rows = _flatten(_plain(d))
    if not rows:
        return f"<p class='skip'>{_e(caption)}: not recorded.</p>"
    return _html_table(pd.DataFrame(rows, columns=["field", "value"]), max_rows=200, max_chars=120,
                       caption=_e(caption))


def _fig_html(fig_or_axes) -> str:
    fig = fig_or_axes if hasattr(fig_or_axes, "savefig") else fig_or_axes[0].figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt='figure' src='data:image/png;base64,{b64}'>"


_CSS = """
:root{--fg:#1d2330;--mut:#5b6475;--line:#dfe3ea;--bg:#ffffff;--soft:#f5f7fa;--acc:#1f4e79}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
 font:15px/1.55 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"DejaVu Sans",sans-serif}
main{max-width:1120px;margin:0 auto;padding:28px 32px 60px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:38px 0 10px;padding-bottom:6px;
 border-bottom:2px solid var(--line)}h3{font-size:16px;margin:22px 0 8px}
.sub{color:var(--mut);margin:0 0 18px;font-size:13px}
nav{font-size:13px;margin:0 0 18px}nav a{color:var(--acc);margin-right:14px;text-decoration:none}
code{font:12.5px/1.3 "SFMono-Regular",Menlo,Consolas,"DejaVu Sans Mono",monospace;background:var(--soft);
 padding:1px 4px;border-radius:3px;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:10px 0}
.card{border:1px solid var(--line);border-radius:8px;padding:10px 14px;min-width:150px;max-width:360px;
 background:var(--soft)}
.card .k{font-size:11px;text-transform:uppercase;letter-spacing:.06em;color:var(--mut)}
.card .v{font-size:15px;font-weight:600;word-break:break-all}.card small{font-weight:400;color:var(--mut)}
.src,.note{color:var(--mut);font-size:13px}
.rule{background:var(--soft);border-left:4px solid var(--acc);padding:10px 14px;border-radius:4px}
.verdict{font-size:16px;padding:10px 14px;border-radius:6px}
.verdict.pass{background:#e8f4ea;border:1px solid #9fcea8}.verdict.none{background:#fbeeee;border:1px solid #e3aaaa}
ol.hyp li{margin:0 0 12px}ul.follow li{margin:0 0 6px}
.badge{display:inline-block;font-size:11px;font-weight:700;text-transform:uppercase;padding:1px 7px;
 border-radius:10px;margin-right:4px;vertical-align:1px}
.badge.pass{background:#1b7837;color:#fff}.badge.fail{background:#b2182b;color:#fff}
.badge.na{background:#888;color:#fff}
.why{color:var(--mut);font-size:13.5px;margin-top:2px}
figure{margin:18px 0 26px}figcaption{font-size:13.5px;color:var(--mut);margin-bottom:6px}
figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:4px}
.skip{color:var(--mut);font-style:italic}.bad{color:#b2182b}
.tw{overflow-x:auto;margin:6px 0 4px}
table{border-collapse:collapse;font-size:12.5px;min-width:40%}
caption{text-align:left;color:var(--mut);font-size:12.5px;padding:0 0 4px;caption-side:top}
th,td{padding:4px 9px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:var(--soft);font-weight:600;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:nth-child(even){background:#fafbfc}
ul.caveats li{margin:0 0 6px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(330px,1fr));gap:6px 22px;align-items:start}
.grid table{width:100%}.grid td{word-break:break-all}
"""
