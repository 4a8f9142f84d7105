"""The pruning report: ``report.json``, ``report.md`` and PNG plots, written into one folder.

- :mod:`~icprune.report.content`: what a report holds (:class:`ModelSummary`, the layer rows)
  and :func:`write_report`, which writes its files;
- :mod:`~icprune.report.text`: how it reads (``report.md``, the before/after table);
- :mod:`~icprune.report.plots`: the plots (matplotlib, imported only when a report is made).
"""

from icprune.report.content import PLOTS, REPORT_FILES, ModelSummary, write_report
from icprune.report.text import comparison_table

__all__ = ["PLOTS", "REPORT_FILES", "ModelSummary", "comparison_table", "write_report"]
