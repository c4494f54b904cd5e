"""The report of a sweep of ``python -m trustcnn.train -m``: tables, heatmaps and pictures from the files its
runs and its evaluation wrote (``python -m trustcnn.report <sweep dir>``; nothing here imports torch).

* :mod:`~trustcnn.report.collect`: the jobs of a sweep directory and its ``evaluation/evaluation.json``;
* :mod:`~trustcnn.report.selection`: the best job and its baseline, by a validation metric;
* :mod:`~trustcnn.report.stats`: groups over seeds, confidence intervals, paired differences against ``loss=ce``;
* :mod:`~trustcnn.report.tables`: Markdown sections and CSV files;
* :mod:`~trustcnn.report.figures`: the lr × λ heatmap and the best-vs-baseline saliency picture;
* :mod:`~trustcnn.report.cli`: :func:`write_report` and the command line.
"""

from trustcnn.report.cli import main, write_report
from trustcnn.report.collect import JobResult, collect_sweep, read_evaluation
from trustcnn.report.selection import is_test_metric, pick_baseline, pick_best, selection_rule, selection_value
from trustcnn.report.stats import confidence_interval, group_jobs, mean_std, pair_with_baseline, paired_differences

__all__ = [
    "JobResult", "collect_sweep", "confidence_interval", "group_jobs", "is_test_metric", "main", "mean_std",
    "pair_with_baseline", "paired_differences", "pick_baseline", "pick_best", "read_evaluation", "selection_rule",
    "selection_value", "write_report",
]
