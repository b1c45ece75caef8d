"""What the onnx-graphsurgeon and onnx_ir adapters share: the temporary node names.

Both fold by exporting the caller's graph to a ModelProto, folding it once (one implementation of the
pass) and mapping the result back onto the caller's own objects. To map it back, each node is given a
unique temporary name before the export; the report, and the nodes the fold kept, then take their
names back.
"""

from __future__ import annotations

from .report import Declined, Folded, FoldReport

PREFIX = "__onnxfold_"


class TempNames:
    """Temporary node names and the names they stand for (a nameless node: ``<op_type>#<index>``,
    as the report calls it)."""

    def __init__(self) -> None:
        self.shown: dict[str, str] = {}  # temporary name -> the name the report shows

    def assign(self, op_type: str, name: str | None) -> str:
        """A fresh temporary name for a node of ``op_type`` named ``name`` (or nameless)."""
        i = len(self.shown)
        tmp = f"{PREFIX}{i}"
        self.shown[tmp] = name or f"{op_type}#{i}"
        return tmp

    def original(self, name: str, op_type: str) -> str:
        """The name to give back to a node now called ``name`` ("" for one that had none)."""
        shown = self.shown.get(name, name)
        return "" if shown.startswith(f"{op_type}#") else shown

    def restore(self, report: FoldReport) -> None:
        """The report names nodes as the caller knows them."""
        records: list[Folded | Declined] = [*report.folded, *report.declined]
        for record in records:
            record.producer = self.shown.get(record.producer, record.producer)
            record.consumer = self.shown.get(record.consumer, record.consumer)
        for left in report.left:
            left.consumer = self.shown.get(left.consumer, left.consumer)
