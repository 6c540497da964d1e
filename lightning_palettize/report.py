"""The palettization report: one row per palettized weight, printable as a table.

Knows nothing about loggers; the Lightning callbacks turn it into scalars, CSV, markdown or
W&B tables.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

__all__ = ["ReportRow", "PalettizationReport"]


@dataclass(frozen=True)
class ReportRow:
    """Statistics of one palettized weight.

    Attributes:
        name: qualified parameter name (``"encoder.0.linear.weight"``).
        n_bits: index width; the LUT has ``2**n_bits`` entries.
        cluster_dim: vector length of the LUT entries.
        num_luts: number of LUT groups.
        num_params: elements of the weight.
        rel_error: ``||W - W_hat||^2 / ||W||^2`` against the weight before palettization.
        bytes_before: dense bytes of the weight.
        bytes_after: exact compact bytes (packed indices + LUTs + scales + quantization params).
        lut_dtype: ``"f32"``/``"f16"``/``"bf16"`` (float LUT) or ``"int8"``/``"uint8"``.
        outliers: weights kept exact (SKM dense-and-sparse); 0 otherwise.
    """

    name: str
    n_bits: int
    cluster_dim: int
    num_luts: int
    num_params: int
    rel_error: float
    bytes_before: int
    bytes_after: int
    lut_dtype: str = "f32"
    outliers: int = 0

    @property
    def compression_ratio(self) -> float:
        """``bytes_before / bytes_after``."""
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")


_HEADERS = (
    "name",
    "n_bits",
    "cluster_dim",
    "num_luts",
    "num_params",
    "rel_error",
    "bytes_before",
    "bytes_after",
    "ratio",
    "lut_dtype",
    "outliers",
)


class PalettizationReport(Mapping[str, ReportRow]):
    """Rows keyed by parameter name (a read-only mapping, like coremltools' report dict).

    Example:
        >>> row = ReportRow("fc.weight", 4, 1, 1, 1024, 0.01, 4096, 576)
        >>> report = PalettizationReport([row])
        >>> report["fc.weight"].compression_ratio > 7
        True
        >>> print(report.to_table())  # doctest: +SKIP
    """

    def __init__(self, rows: list[ReportRow] | None = None) -> None:
        self._rows: dict[str, ReportRow] = {}
        for row in rows or []:
            self._rows[row.name] = row

    def __getitem__(self, name: str) -> ReportRow:
        return self._rows[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def rows(self) -> list[ReportRow]:
        """The rows in model order."""
        return list(self._rows.values())

    def summary(self) -> dict[str, float]:
        """Totals: bytes before/after, overall compression ratio, parameter-weighted mean error."""
        before = sum(r.bytes_before for r in self._rows.values())
        after = sum(r.bytes_after for r in self._rows.values())
        params = sum(r.num_params for r in self._rows.values())
        err = sum(r.rel_error * r.num_params for r in self._rows.values())
        return {
            "num_weights": len(self._rows),
            "num_params": params,
            "bytes_before": before,
            "bytes_after": after,
            "compression_ratio": before / after if after else float("nan"),
            "mean_rel_error": err / params if params else float("nan"),
        }

    def as_dicts(self) -> list[dict[str, object]]:
        """One plain dict per row (with ``ratio`` added), for CSV / loggers / JSON."""
        out = []
        for row in self._rows.values():
            d = asdict(row)
            d["ratio"] = row.compression_ratio
            out.append({h: d[h] for h in _HEADERS})
        return out

    def to_csv(self) -> str:
        """The rows as CSV text with a header line."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(_HEADERS))
        writer.writeheader()
        writer.writerows(self.as_dicts())
        return buf.getvalue()

    def to_table(self, markdown: bool = False) -> str:
        """A fixed-width (or markdown) table of the rows plus a total line."""
        cells = [list(_HEADERS)]
        for d in self.as_dicts():
            cells.append(
                [
                    str(d["name"]),
                    str(d["n_bits"]),
                    str(d["cluster_dim"]),
                    str(d["num_luts"]),
                    f"{d['num_params']:,}",
                    f"{d['rel_error']:.3e}",
                    f"{d['bytes_before']:,}",
                    f"{d['bytes_after']:,}",
                    f"{d['ratio']:.2f}x",
                    str(d["lut_dtype"]),
                    str(d["outliers"]),
                ]
            )
        s = self.summary()
        cells.append(
            [
                "TOTAL",
                "",
                "",
                "",
                f"{s['num_params']:,}",
                f"{s['mean_rel_error']:.3e}",
                f"{s['bytes_before']:,}",
                f"{s['bytes_after']:,}",
                f"{s['compression_ratio']:.2f}x",
                "",
                "",
            ]
        )
        if markdown:
            lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
            lines += ["| " + " | ".join(c) + " |" for c in cells[1:]]
            return "\n".join(lines)
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()

    def __repr__(self) -> str:
        return f"PalettizationReport({len(self)} weights, {self.summary()})"
